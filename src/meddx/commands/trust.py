"""``meddx sign``, ``meddx verify``, ``meddx keys sign-key`` and ``meddx audit verify``: signed
model packages and the hash-chained audit log."""

from __future__ import annotations

from pathlib import Path

import typer

from meddx.errors import ConfigError

__all__ = ["register"]

audit_app = typer.Typer(help="Check the service's hash-chained audit log.",
                        no_args_is_help=True)


def sign(
    model: Path = typer.Argument(..., help="Model package folder to sign."),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (PEM, from "
                             "`meddx keys sign-key`)."),
) -> None:
    """Sign a package: checks every file against manifest.json, then writes manifest.sig."""
    from meddx.signing import sign_package

    record = sign_package(model, key)
    typer.echo(f"signed {model} (key sha256 {record['key_sha256']}, manifest sha256 "
               f"{record['manifest_sha256']})")


def verify(
    model: Path = typer.Argument(..., help="Model package folder to check."),
    trust_key: list[Path] = typer.Option([], "--trust-key", help="Ed25519 public key (PEM) "
                                         "that must have signed it. Repeatable."),
) -> None:
    """Check every file of a package (sub-folders such as a slide model's encoder/ included)
    against manifest.json and, with --trust-key, its signature; exit 1 naming what failed."""
    from meddx.package import load_package

    package = load_package(model, trust=trust_key or None)
    signed = f"; signed by key sha256 {package.signer}" if package.signer else ""
    typer.echo(f"OK: {model}: {len(package.manifest)} files match manifest.json{signed}")


def sign_key(
    out: Path = typer.Option(Path("keys"), "--out", help="Folder for the key files."),
    name: str = typer.Option("meddx-signing", "--name", help="File name stem of the pair."),
) -> None:
    """Make an Ed25519 package-signing key pair: NAME.key (secret) + NAME.pub (for --trust-key)."""
    from meddx.signing import generate_key_pair, key_fingerprint, load_public_key

    private, public = generate_key_pair(out, name)
    typer.echo(f"wrote {private} (secret: signs packages) and {public} (give to "
               f"`meddx serve --trust-key`); key sha256 {key_fingerprint(load_public_key(public))}")


@audit_app.command("verify")
def audit_verify(
    log: Path = typer.Argument(..., help="Audit log (JSON lines) written by `meddx serve`."),
) -> None:
    """Check the hash chain: OK with the line count, or the first bad line and why (exit 1)."""
    from meddx.serving.audit import verify_log

    if not log.is_file():
        raise ConfigError("no audit log there", path=str(log))
    check = verify_log(log)
    for line, reason in check.restarts:
        typer.echo(f"note: line {line} starts a new chain segment ({reason})")
    if check.unchained:
        typer.echo(f"note: the first {check.unchained} line(s) were written before chaining "
                   "and are not covered")
    if not check.ok:
        typer.echo(f"FAILED: {log} line {check.bad_line}: {check.reason}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {check.lines} lines, chain intact; head {check.head}")


def register(app: typer.Typer) -> None:
    """Add ``sign``, ``verify``, ``keys sign-key`` and ``audit verify`` to the CLI."""
    from meddx.commands.serve import keys_app

    app.command("sign")(sign)
    app.command("verify")(verify)
    keys_app.command("sign-key")(sign_key)
    app.add_typer(audit_app, name="audit")
