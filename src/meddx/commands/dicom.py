"""``meddx dicom``: a model as a DICOM node (listen / watch), its worklist and its status."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import typer

__all__ = ["register", "dicom_app"]

dicom_app = typer.Typer(help="PACS integration: receive studies (DICOM C-STORE or DICOMweb), "
                        "send results back as DICOM SR + heat maps, rank the worklist.",
                        no_args_is_help=True)

_WORK = typer.Option(Path("dicom-work"), "--work", help="Work folder: received instances, "
                     "state (SQLite), queued results.")
_DEST = typer.Option(None, "--dest", help="Where results go: AE@host:port (C-STORE) or a "
                     "DICOMweb URL (STOW-RS).")
_DEST_AUTH_FILE = typer.Option(None, "--dest-auth-file", help="File holding the destination's "
                               "credentials (a token, or user:password with --dest-auth basic).")
_DEST_AUTH_ENV = typer.Option(None, "--dest-auth-env", help="Environment variable holding the "
                              "destination's credentials.")
_DEST_AUTH = typer.Option("bearer", "--dest-auth", help="bearer (the file/variable holds a "
                          "token) or basic (it holds user:password).")
_ROUTING = typer.Option(None, "--routing", help="Routing YAML: which model runs on which "
                        "series (see docs/pacs.md).")
_QUIET = typer.Option(10.0, "--quiet", help="Seconds without a new instance after which a "
                      "study is complete.")
_DEID = typer.Option(False, "--deid", help="Send de-identified copies (research destination).")
_DURATION = typer.Option(None, "--duration", help="Stop after this many seconds (default: run "
                         "until Ctrl-C).")


def _destination(dest: str | None, auth_file: Path | None, auth_env: str | None,
                 auth_kind: str = "bearer") -> Any:
    from meddx.dicom.send import Destination
    from meddx.errors import ConfigError

    if not dest:
        raise ConfigError("no destination for the results", hint="add --dest AE@host:port or "
                          "--dest https://pacs/dicom-web")
    auth: dict[str, Any] = {"credentials_file": auth_file, "credentials_env": auth_env}
    auth = {k: v for k, v in auth.items() if v}
    if auth:
        auth["auth"] = auth_kind
    if dest.startswith(("http://", "https://")):
        return Destination(kind="dicomweb", url=dest, **auth)
    ae, _, rest = dest.partition("@")
    host, _, port = rest.rpartition(":")
    if not ae or not host or not port.isdigit():
        raise ConfigError(f"--dest {dest!r} is neither AE@host:port nor a URL",
                          hint="e.g. --dest ORTHANC@127.0.0.1:4242")
    return Destination(kind="dimse", ae_title=ae, host=host, port=int(port), **auth)


def _pipeline(models: list[Path], work: Path, dest: Any, routing: Path | None, quiet: float,
              deid: bool) -> Any:
    from meddx.dicom.pipeline import Pipeline
    from meddx.dicom.routing import load_routing
    from meddx.dicom.send import Outbox
    from meddx.dicom.store import Store
    from meddx.inference import load_model

    store = Store(work)
    predictors = [load_model(m) for m in models]
    return Pipeline(store, predictors, Outbox(work / "outbox.sqlite"), dest,
                    load_routing(routing), quiet=quiet, deid=deid)


def _serve(pipeline: Any, duration: float | None, extra: Any = None) -> None:
    import logging

    # their INFO lines name instances and peers by UID; ours name studies by salted key
    for noisy in ("highdicom", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    worker.start()
    end = None if duration is None else time.monotonic() + duration
    try:
        while end is None or time.monotonic() < end:
            if extra is not None:
                extra()
            time.sleep(0.5)
    except KeyboardInterrupt:
        typer.echo("stopping", err=True)
    finally:
        stop.set()
        worker.join(timeout=60)


@dicom_app.command("listen")
def listen(
    models: list[Path] = typer.Argument(..., help="Model package folder(s)."),
    ae_title: str = typer.Option("MEDDX", "--ae-title", help="This node's AE title."),
    port: int = typer.Option(11112, "--port", help="DICOM port to listen on."),
    allow: list[str] = typer.Option(..., "--allow", help="Calling AE title allowed to send, "
                                    "AE or AE@host (repeat for more)."),
    work: Path = _WORK, dest: str = _DEST, dest_auth_file: Path = _DEST_AUTH_FILE,
    dest_auth_env: str = _DEST_AUTH_ENV, dest_auth: str = _DEST_AUTH, routing: Path = _ROUTING,
    quiet: float = _QUIET, deid: bool = _DEID,
    max_instance_mb: int = typer.Option(512, "--max-instance-mb", help="Largest instance."),
    max_instances: int = typer.Option(5000, "--max-instances", help="Most instances a study."),
    max_per_ae: int = typer.Option(4, "--max-associations-per-ae",
                                   help="Open associations allowed per calling AE."),
    duration: float = _DURATION,
) -> None:
    """Be a DICOM node: receive studies by C-STORE, analyse each complete study, send the
    SR and heat maps to --dest.

    Example: ``meddx dicom listen runs/breast/model --allow ORTHANC@127.0.0.1 --dest
    ORTHANC@127.0.0.1:4242``
    """
    from meddx.dicom.listener import Listener, ListenerConfig, parse_allow

    pipeline = _pipeline(models, work, _destination(dest, dest_auth_file, dest_auth_env,
                                                    dest_auth), routing, quiet, deid)
    config = ListenerConfig(ae_title=ae_title, port=port, allow=parse_allow(allow),
                            max_instance_bytes=max_instance_mb * 1024 * 1024,
                            max_instances_per_study=max_instances,
                            max_associations_per_ae=max_per_ae)
    listener = Listener(pipeline.store, config)
    listener.start()
    typer.echo(f"listening as {ae_title} on port {listener.port}; work folder {work}", err=True)
    try:
        _serve(pipeline, duration)
    finally:
        listener.stop()


@dicom_app.command("watch")
def watch(
    url: str = typer.Argument(..., help="DICOMweb root, e.g. http://pacs:8042/dicom-web."),
    models: list[Path] = typer.Option(..., "--model", help="Model package folder (repeat)."),
    auth_file: Path = typer.Option(None, "--auth-file", help="File with the server's "
                                   "credentials (a token, or user:password with --auth basic)."),
    auth_env: str = typer.Option(None, "--auth-env", help="Environment variable with them."),
    auth: str = typer.Option("bearer", "--auth", help="bearer or basic."),
    since: str = typer.Option(None, "--since", help="Only studies from this Study Date "
                              "(YYYYMMDD)."),
    interval: float = typer.Option(10.0, "--interval", help="Seconds between QIDO-RS polls."),
    work: Path = _WORK, dest: str = _DEST, dest_auth_file: Path = _DEST_AUTH_FILE,
    dest_auth_env: str = _DEST_AUTH_ENV, dest_auth: str = _DEST_AUTH, routing: Path = _ROUTING,
    quiet: float = _QUIET, deid: bool = _DEID, duration: float = _DURATION,
) -> None:
    """Poll a DICOMweb server for new studies (QIDO-RS), retrieve them (WADO-RS), analyse
    them and send the results to --dest (default: STOW-RS back to the same server).

    Example: ``MEDDX_PACS_AUTH='Bearer …' meddx dicom watch https://pacs/dicom-web --model
    runs/breast/model --auth-env MEDDX_PACS_AUTH``
    """
    from meddx.dicom.watch import Watcher, make_client, read_credentials

    client = make_client(url, read_credentials(auth_file, auth_env, auth))  # fail fast
    if dest is None:  # STOW-RS back to the server watched, with its credentials
        dest, dest_auth_file, dest_auth_env, dest_auth = url, auth_file, auth_env, auth
    pipeline = _pipeline(models, work, _destination(dest, dest_auth_file, dest_auth_env,
                                                    dest_auth), routing, quiet, deid)
    watcher = Watcher(client, pipeline.store, since=since)
    last = [0.0]

    def poll() -> None:
        if time.monotonic() - last[0] >= interval:
            last[0] = time.monotonic()
            watcher.poll()

    _serve(pipeline, duration, extra=poll)


@dicom_app.command("queue")
def queue(work: Path = _WORK,
          as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
          as_fhir: bool = typer.Option(False, "--fhir", help="A FHIR R4B Bundle of Task "
                                       "resources (priority, the study as focus)."),
          show_uid: bool = typer.Option(False, "--show-study-uid",
                                        help="Show Study Instance UIDs (operators only).")) -> None:
    """The worklist: studies by priority (stat, urgent, routine), then risk, highest first."""
    from rich.console import Console
    from rich.table import Table

    from meddx.dicom.worklist import (
        TABLE_HEADER,
        load_worklist,
        to_fhir_bundle,
        worklist_json,
        worklist_rows,
    )

    store = _store(work)
    entries = load_worklist(store.path, include_uid=show_uid)
    if as_fhir:
        typer.echo(json.dumps(to_fhir_bundle(entries), indent=1))
        return
    if as_json:
        typer.echo(json.dumps(worklist_json(store.path, include_uid=show_uid), indent=1))
        return
    table = Table(title=f"worklist ({len(entries)} studies)")
    for c in TABLE_HEADER:
        table.add_column(c)
    for row in worklist_rows(entries):
        table.add_row(*row)
    Console().print(table)


@dicom_app.command("status")
def status(work: Path = _WORK,
           as_json: bool = typer.Option(False, "--json", help="JSON instead of text.")) -> None:
    """Received, analysed, failed (with reasons) and pending: nothing is lost silently."""
    from meddx.dicom.send import Outbox

    store = _store(work)
    outbox = Outbox(work / "outbox.sqlite")
    data = {"counts": store.counts(), "failures": store.failures(),
            "pending_deliveries": [_plain(p) for p in outbox.pending()],
            "failed_deliveries": [_plain(p) for p in outbox.failed()]}
    if as_json:
        typer.echo(json.dumps(data, indent=1, default=str))
        return
    c = data["counts"]
    typer.echo(f"received {c['received']} instance(s) in {c['studies']} study(ies) "
               f"(+{c['duplicates']} duplicate(s)): {c['analysed']} analysed, {c['failed']} "
               f"failed, {c['pending']} pending; {c['analyses']} result(s) made")
    typer.echo(f"deliveries: {len(data['pending_deliveries'])} pending, "
               f"{len(data['failed_deliveries'])} failed")
    for f in data["failures"]:
        typer.echo(f"  {f['reason']}: study {f['study']} instance {f['sop_uid'] or '-'}: "
                   f"{f['detail']}")


def _plain(item: Any) -> Any:
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json")
    if hasattr(item, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(item)
    return item


def _store(work: Path) -> Any:
    from meddx.dicom.store import Store
    from meddx.errors import ConfigError

    if not (work / "state.sqlite").exists():
        raise ConfigError(f"no meddx DICOM work folder at {work}",
                          hint="pass the --work folder given to `meddx dicom listen`")
    return Store(work)


def register(app: typer.Typer) -> None:
    """Add ``meddx dicom …`` to the CLI."""
    app.add_typer(dicom_app, name="dicom")
