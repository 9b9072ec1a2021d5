"""``meddx sign`` and ``meddx keys signing-key``: Ed25519 signatures on model packages."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]


def sign(
    model: Path = typer.Argument(..., help="Model package folder (runs/x/model)."),
    key: Path = typer.Option(..., "--key", help="Ed25519 private key (PEM), from "
                             "`meddx keys signing-key`."),
) -> None:
    """Sign a package's manifest (which holds the sha256 of every file); writes manifest.sig.

    The package's files are verified first: a changed package is never signed. Serve it with
    ``meddx serve MODEL --trust-key KEY.pub.pem``.
    """
    from meddx.signing import sign_package

    record = sign_package(model, key)
    typer.echo(f"signed {model} (manifest sha256 {record['manifest_sha256'][:16]}…) with key "
               f"{record['key'][:16]}…")


def signing_key(
    out: Path = typer.Option(Path("keys"), "--out", help="Folder for the key files."),
    name: str = typer.Option("package-signing", "--name", help="File name stem."),
) -> None:
    """Make an Ed25519 package-signing key: NAME.pem (secret, 0600) and NAME.pub.pem."""
    from meddx.signing import fingerprint, load_public_key, new_signing_key

    private, public = new_signing_key(out, name)
    typer.echo(f"wrote {private} (secret: signs with `meddx sign --key`) and {public} (give to "
               f"`meddx serve --trust-key`); key {fingerprint(load_public_key(public))[:16]}…")


def register(app: typer.Typer) -> None:
    """Add ``sign`` and ``keys signing-key`` (the ``keys`` group comes from ``serve``)."""
    from meddx.commands.serve import keys_app

    app.command("sign")(sign)
    keys_app.command("signing-key")(signing_key)
