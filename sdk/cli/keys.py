"""``rrise keys`` (Ed25519 signing and ZeroMQ CURVE key pairs), ``rrise inspect`` (a bundle's
manifest, id, signature and integrity) and the ``--trust KEY.pub`` option they share with ``rrise run``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, fail

__all__ = ["TrustOpt", "trusted_key"]

TrustOpt = Annotated[
    Path | None,
    typer.Option(
        "--trust",
        help="Ed25519 public key (KEY.pub from `rrise keys`): refuse a bundle unless its manifest.sig "
        "is this key's valid signature of its manifest.",
    ),
]


def trusted_key(path: Path | None) -> Any:
    """The public key in ``path`` (None when not given); exit 1 naming the file if it is unusable."""
    if path is None:
        return None
    from rrise.signing import SigningError, load_public_key

    try:
        return load_public_key(path)
    except SigningError as exc:
        raise fail(f"--trust: {exc}") from None


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Recompute each variant's quantile from calibration.npz and that variant's own model "
            "and refuse a mismatch (TensorRT engines: not verifiable off their device).",
        ),
    ] = False,
    trust: TrustOpt = None,
) -> None:
    """Show a bundle's manifest, id, signature, guarantee and integrity; exit 1 on any integrity
    failure (and, with --trust, unless a valid signature by that key covers the manifest).

    Example: `rrise inspect runs/demo/bundle --verify --trust keys/robot.pub`
    """
    from rrise.inspect import format_inspection, inspect_bundle

    summary, problems = inspect_bundle(bundle, trust=trusted_key(trust), verify=verify)
    if as_json:
        typer.echo(json.dumps({"summary": summary, "problems": problems, "ok": not problems}, indent=2))
    else:
        typer.echo(format_inspection(summary, problems))
    if problems:
        raise typer.Exit(1)


class KeyKind(str, Enum):
    signing = "signing"
    curve = "curve"


@app.command()
def keys(
    prefix: Annotated[Path, typer.Argument(help="Path prefix of the key files, e.g. keys/robot.")],
    kind: Annotated[
        KeyKind,
        typer.Option(
            "--kind",
            help="signing: an Ed25519 pair, PREFIX.key (0600, signs bundles: rrise-export --sign) and "
            "PREFIX.pub (rrise run/inspect --trust). curve: a ZeroMQ CURVE pair, PREFIX.curve.key "
            "(rrise run --curve-secret) and PREFIX.curve.pub (rrise subscribe --curve-server-key).",
        ),
    ],
) -> None:
    """Make a key pair: Ed25519 for signing bundles, or ZeroMQ CURVE for an encrypted record stream.
    Never overwrites a key.

    Example: `rrise keys keys/robot --kind signing`
    """
    try:
        if kind is KeyKind.signing:
            from rrise.signing import key_fingerprint, load_public_key, write_signing_keypair

            public, secret = write_signing_keypair(prefix)
            note = f" (key {key_fingerprint(load_public_key(public))})"
        else:
            from rrise.curve import write_curve_keypair

            public, secret = write_curve_keypair(prefix)
            note = ""
    except (ValueError, OSError) as exc:  # SigningError and CurveKeyError are ValueErrors
        raise fail(str(exc)) from None
    typer.echo(f"public  {public}{note}")
    typer.echo(f"secret  {secret} (mode 0600: keep it private)")
