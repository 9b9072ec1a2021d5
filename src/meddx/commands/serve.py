"""``meddx serve``, ``meddx export`` and ``meddx keys``: run the clinical service, export ONNX,
make API keys, EHR signing keys and test tokens."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import typer

from meddx.errors import ConfigError

__all__ = ["register"]

logger = logging.getLogger(__name__)

keys_app = typer.Typer(help="API keys, EHR signing keys and test tokens for `meddx serve`.",
                       no_args_is_help=True)


def serve(
    packages: list[Path] = typer.Argument(..., help="Model package folders (runs/x/model)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, help="TCP port."),
    public_url: str | None = typer.Option(None, "--public-url", help="External base URL "
                                          "(JWT `aud` is this + the endpoint path)."),
    cds_jwks: list[Path] = typer.Option([], "--cds-jwks", help="JWKS of an allow-listed EHR, or "
                                        "a trust file {issuers: [...]}. Repeatable."),
    cds_issuer: str | None = typer.Option(None, "--cds-issuer", help="`iss` of the keys in a "
                                          "plain JWKS given with --cds-jwks."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="Hashed API keys "
                                             "(`meddx keys api-key` writes it)."),
    trust_key: list[Path] = typer.Option([], "--trust-key", help="Ed25519 public key (PEM) "
                                         "whose signed packages alone are served. Repeatable."),
    research_use: bool = typer.Option(False, "--research-use", help="Serve research-only "
                                      "models; every answer then says so."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Local demo only: "
                                          "no authentication, loopback only."),
    backend: str = typer.Option("auto", help="auto | torch | onnx | onnx-int8."),
    max_body_mb: float = typer.Option(20.0, help="Request body cap (MB)."),
    max_in_flight: int = typer.Option(32, help="Requests admitted at once; more queue."),
    queue_size: int | None = typer.Option(None, "--queue-size", help="Requests waiting for "
                                          "admission; more get 429 (default 2 × "
                                          "--max-in-flight; 0: no queue)."),
    queue_timeout_s: float = typer.Option(10.0, "--queue-timeout-s", help="Longest wait "
                                          "before a request runs (s); then 429, or 503 once "
                                          "admitted."),
    workers: int = typer.Option(2, help="Requests computing at once."),
    timeout: float = typer.Option(30.0, help="Per-request timeout (s); then 503."),
    body_timeout_s: float = typer.Option(60.0, "--body-timeout-s", help="Longest time to "
                                         "receive a request body (s; slide uploads exempt); "
                                         "then 408 and the connection is closed."),
    body_idle_timeout_s: float = typer.Option(15.0, "--body-idle-timeout-s", help="Longest "
                                              "wait for the next chunk of any body (s); "
                                              "then 408."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Browser origin "
                                          "(https://host[:port]) allowed cross-origin calls, "
                                          "e.g. a browser-based CDS client. Repeatable; "
                                          "none: no CORS."),
    api_docs: bool = typer.Option(False, "--api-docs", help="Serve the interactive API docs "
                                  "(/docs, /redoc), assets from this service only."),
    threads: int | None = typer.Option(None, help="Intra-op threads per inference."),
    audit_log: Path | None = typer.Option(None, help="Audit log (JSON lines)."),
    heatmap_ttl_hours: float = typer.Option(24.0, help="How long heat-map links live."),
    fhir_server_allow: list[str] = typer.Option([], "--fhir-server-allow", help="FHIR server a "
                                                "CDS call may name for fetching. Repeatable."),
    cds_explain: bool = typer.Option(True, "--cds-explain/--no-cds-explain",
                                      help="Explanations on CDS cards (heat-map "
                                     "page for images, top findings for EHR)."),
    jobs_workers: int | None = typer.Option(None, "--jobs-workers", help="Slide jobs running "
                                            "at once (default: one per core)."),
    jobs_queue: int = typer.Option(8, "--jobs-queue", help="Slide jobs waiting; more get 429."),
    slide_root: list[Path] = typer.Option([], "--slide-root", help="Folder whose slides a job "
                                          "may name by path. Repeatable."),
    max_slide_mb: float = typer.Option(4096.0, "--max-slide-mb", help="Slide size cap (MB)."),
    job_dir: Path | None = typer.Option(None, "--job-dir", help="Server-owned folder for job "
                                        "files (default: a private temporary folder)."),
    operating_point: list[str] = typer.Option(
        [], "--operating-point", help="Decision rule of this deployment: NAME (every model "
        "with operating points, e.g. balanced) or MODEL=NAME (one model). Repeatable."),
    metrics: str = typer.Option("auth", "--metrics", help="GET /metrics (Prometheus): auth "
                                "(API key or JWT, as the REST API), open (no auth; private "
                                "scrape networks only) or off."),
) -> None:
    """Serve model packages over REST, FHIR R4, CDS Hooks 2.0 and a web page.

    Example: ``meddx serve runs/breast/model --api-key-file keys/api-keys.json
    --cds-jwks keys/ehr-jwks.json --cds-issuer https://ehr.example.org --research-use``
    """
    import uvicorn

    from meddx.serving.app import create_app
    from meddx.serving.settings import (
        LOOPBACK_HOSTS,
        ServeSettings,
        load_api_keys,
        load_trust,
        parse_operating_points,
    )

    if insecure_no_auth:
        if host not in LOOPBACK_HOSTS:
            raise ConfigError("--insecure-no-auth binds to loopback only", hint="drop --host")
        logger.warning("!!! --insecure-no-auth: NO AUTHENTICATION; loopback only, demo only !!!")
    if metrics not in ("auth", "open", "off"):
        raise ConfigError(f"--metrics {metrics!r}: choose auth, open or off")
    issuers = [t for path in cds_jwks for t in load_trust(path, cds_issuer)]
    settings = ServeSettings(
        host=host, port=port, public_url=public_url, issuers=tuple(issuers),
        api_keys=load_api_keys(api_key_file) if api_key_file else {},
        insecure_no_auth=insecure_no_auth, research_use=research_use, backend=backend,
        trust_keys=tuple(trust_key),
        max_body_bytes=int(max_body_mb * 1024 * 1024), max_in_flight=max_in_flight,
        queue_size=queue_size, queue_timeout_s=queue_timeout_s,
        workers=workers, request_timeout_s=timeout, threads=threads, audit_log=audit_log,
        body_timeout_s=body_timeout_s, body_idle_timeout_s=body_idle_timeout_s,
        cors_origins=_cors_origins(cors_origin), api_docs=api_docs,
        heatmap_ttl_s=int(heatmap_ttl_hours * 3600), fhir_server_allow=tuple(fhir_server_allow),
        cds_explain=cds_explain, jobs_queue=jobs_queue, slide_roots=tuple(slide_root),
        max_slide_bytes=int(max_slide_mb * 1024 * 1024), job_dir=job_dir,
        **({"jobs_workers": jobs_workers} if jobs_workers else {}),
        operating_points=parse_operating_points(operating_point),
        metrics=metrics,
        **({"link_secret": os.environ["MEDDX_LINK_SECRET"]}
           if os.environ.get("MEDDX_LINK_SECRET") else {}),
    )
    app = create_app(list(packages), settings)
    typer.echo(f"meddx serving {', '.join(app.state.meddx.hub.models)} on "
               f"http://{host}:{port}/  (public URL {settings.base_url})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False,
                limit_concurrency=(max_in_flight + settings.admission_queue) * 2 + 16,
                timeout_keep_alive=5)


def _cors_origins(values: list[str]) -> tuple[str, ...]:
    """``--cors-origin`` values, each an exact ``scheme://host[:port]`` (checked here so the
    error names the flag)."""
    from meddx.serving.settings import valid_origin

    for value in values:
        if not valid_origin(value):
            raise ConfigError(f"--cors-origin {value!r} is not an origin",
                              hint="give scheme://host[:port] exactly, e.g. "
                                   "https://ehr.example.org (no path, no wildcard)")
    return tuple(values)


def export(
    model: Path = typer.Argument(..., help="Model package folder."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Write model.onnx."),
    int8: bool = typer.Option(False, "--int8", help="Also write the static INT8 variant, "
                              "calibrated on the training split."),
    calib_samples: int = typer.Option(256, help="Training inputs for INT8 calibration."),
) -> None:
    """Export a package to ONNX (and INT8); the Predictor then uses onnxruntime."""
    from meddx.inference.onnx import export_onnx

    if not onnx:
        raise ConfigError("nothing to export", hint="use --onnx")
    report = export_onnx(model, int8=int8, calib_samples=calib_samples)
    typer.echo(json.dumps(report, indent=2))


@keys_app.command("api-key")
def api_key(
    key_id: str = typer.Argument(..., help="A name for the key (shown in the audit log)."),
    file: Path = typer.Option(Path("keys/api-keys.json"), "--file", help="Key file to add to."),
) -> None:
    """Make an API key: prints it once, stores only its sha256."""
    from meddx.serving.auth import new_api_key

    data = json.loads(file.read_text()) if file.is_file() else {"keys": []}
    if any(k["id"] == key_id for k in data["keys"]):
        raise ConfigError(f"key id '{key_id}' exists already in {file}")
    token, digest = new_api_key(key_id)
    data["keys"].append({"id": key_id, "sha256": digest})
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2))
    typer.echo(token)


@keys_app.command("ehr")
def ehr_keys(
    out: Path = typer.Option(Path("keys"), help="Folder for the key files."),
    alg: str = typer.Option("ES384", help="ES384 or RS384 (CDS Hooks recommends these)."),
    kid: str | None = typer.Option(None, help="Key id (default: random)."),
) -> None:
    """Make an EHR signing key: ``ehr-private.jwk.json`` (keep secret) + ``ehr-jwks.json``."""
    from joserfc.jwk import ECKey, RSAKey

    kid = kid or uuid.uuid4().hex[:12]
    params = {"kid": kid, "alg": alg, "use": "sig"}
    if alg == "ES384":
        key = ECKey.generate_key("P-384", parameters=params, private=True)
    elif alg == "RS384":
        key = RSAKey.generate_key(3072, parameters=params, private=True)
    else:
        raise ConfigError(f"alg {alg} not offered; choose ES384 or RS384")
    out.mkdir(parents=True, exist_ok=True)
    private = out / "ehr-private.jwk.json"
    private.write_text(json.dumps(key.as_dict(private=True)))
    private.chmod(0o600)
    (out / "ehr-jwks.json").write_text(json.dumps({"keys": [key.as_dict(private=False)]},
                                                  indent=2))
    typer.echo(f"wrote {private} (secret) and {out / 'ehr-jwks.json'} (give to meddx serve)")


@keys_app.command("token")
def make_token(
    key: Path = typer.Option(..., help="Private JWK (from `meddx keys ehr`)."),
    iss: str = typer.Option(..., help="Issuer (the EHR's URL)."),
    aud: str = typer.Option(..., help="Exact URL of the endpoint to call."),
    ttl: int = typer.Option(300, help="Lifetime (s)."),
    sub: str = typer.Option("meddx-cli", help="Client id."),
) -> None:
    """Sign a one-time JWT as an EHR would (for demos and curl)."""
    from joserfc import jwt
    from joserfc.jwk import import_key

    jwk = json.loads(key.read_text())
    k = import_key(jwk)
    alg = jwk.get("alg") or ("ES384" if jwk.get("kty") == "EC" else "RS384")
    now = int(time.time())
    claims = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + ttl,
              "jti": str(uuid.uuid4())}
    typer.echo(jwt.encode({"alg": alg, "kid": jwk["kid"], "typ": "JWT"}, claims, k,
                          algorithms=[alg]))


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``export`` and ``keys`` to the CLI."""
    app.command("serve")(serve)
    app.command("export")(export)
    app.add_typer(keys_app, name="keys")
