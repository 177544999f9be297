"""``rrise keys`` (Ed25519 signing and ZeroMQ CURVE key pairs), ``rrise inspect`` (a bundle's
manifest, id, signature and integrity) and the ``--trust KEY.pub`` key file they share with ``rrise
run``; each command bound to its options (:class:`InspectOptions`, :class:`KeysOptions`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from rrise.options import bind

from .app import app, fail

__all__ = ["KEY_WRITERS", "InspectOptions", "KeyKind", "KeysOptions", "trusted_key"]

TRUST_HELP = (
    "Ed25519 public key (KEY.pub from `rrise keys`): refuse a bundle unless its manifest.sig is this "
    "key's valid signature of its manifest."
)


def trusted_key(path: Path | None) -> Any:
    """The public key in ``path`` (None when not given); exit 1 naming the file if it is unusable."""
    if path is None:
        return None
    from rrise.signing import SigningError, load_public_key

    try:
        return load_public_key(path)
    except SigningError as exc:
        raise fail(f"--trust: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class InspectOptions:
    """``rrise inspect``'s options."""

    bundle: Path = field(metadata={"help": "Bundle folder.", "argument": True})
    as_json: bool = field(default=False, metadata={"help": "Print JSON instead of text.", "flag": "--json"})
    verify: bool = field(
        default=False,
        metadata={
            "help": "Recompute each variant's quantile from calibration.npz and that variant's own model "
            "and refuse a mismatch (TensorRT engines: not verifiable off their device)."
        },
    )
    trust: Path | None = field(default=None, metadata={"help": TRUST_HELP})


@app.command()
@bind(InspectOptions)
def inspect(options: InspectOptions) -> None:
    """Show a bundle's manifest, id, signature, guarantee and integrity; exit 1 on any integrity
    failure (and, with --trust, unless a valid signature by that key covers the manifest).

    Example: `rrise inspect runs/demo/bundle --verify --trust keys/robot.pub`
    """
    from rrise.inspect import format_inspection, inspect_bundle

    key = trusted_key(options.trust)
    summary, problems = inspect_bundle(options.bundle, trust=key, verify=options.verify)
    if options.as_json:
        typer.echo(json.dumps({"summary": summary, "problems": problems, "ok": not problems}, indent=2))
    else:
        typer.echo(format_inspection(summary, problems))
    if problems:
        raise typer.Exit(1)


def _signing_pair(prefix: Path) -> tuple[Path, Path, str]:
    from rrise.signing import key_fingerprint, load_public_key, write_signing_keypair

    public, secret = write_signing_keypair(prefix)
    return public, secret, f" (key {key_fingerprint(load_public_key(public))})"


def _curve_pair(prefix: Path) -> tuple[Path, Path, str]:
    from rrise.curve import write_curve_keypair

    public, secret = write_curve_keypair(prefix)
    return public, secret, ""


# `rrise keys --kind`: each kind of key pair → what writes it (public, secret, a note on the key)
KEY_WRITERS = {"signing": _signing_pair, "curve": _curve_pair}
KeyKind = Enum("KeyKind", {k: k for k in KEY_WRITERS}, type=str, module=__name__)


@dataclass(frozen=True, kw_only=True)
class KeysOptions:
    """``rrise keys``'s options."""

    prefix: Path = field(
        metadata={"help": "Path prefix of the key files, e.g. keys/robot.", "argument": True}
    )
    kind: KeyKind = field(
        metadata={
            "help": "signing: an Ed25519 pair, PREFIX.key (0600, signs bundles: rrise-export --sign) and "
            "PREFIX.pub (rrise run/inspect --trust). curve: a ZeroMQ CURVE pair, PREFIX.curve.key "
            "(rrise run --curve-secret) and PREFIX.curve.pub (rrise subscribe --curve-server-key)."
        }
    )


@app.command()
@bind(KeysOptions)
def keys(options: KeysOptions) -> None:
    """Make a key pair: Ed25519 for signing bundles, or ZeroMQ CURVE for an encrypted record stream.
    Never overwrites a key.

    Example: `rrise keys keys/robot --kind signing`
    """
    try:
        public, secret, note = KEY_WRITERS[options.kind.value](options.prefix)
    except (ValueError, OSError) as exc:  # SigningError and CurveKeyError are ValueErrors
        raise fail(str(exc)) from None
    typer.echo(f"public  {public}{note}")
    typer.echo(f"secret  {secret} (mode 0600: keep it private)")
