"""ZeroMQ CURVE key pairs for an encrypted, server-authenticated record stream.

``rrise keys robot --kind curve`` (:func:`write_curve_keypair`) writes ``robot.curve.key`` (the
publisher's secret key, mode 0600) and ``robot.curve.pub`` (its public key, to copy to every
subscriber), both in ZeroMQ's z85 certificate format (the one ``zmq.auth.load_certificate`` and
czmq's ``zcert`` read). ``rrise run --publish … --curve-secret robot.curve.key`` makes the publisher
a CURVE server; ``rrise subscribe … --curve-server-key robot.curve.pub`` connects as a CURVE client
with a fresh key pair of its own.

What CURVE gives here: the records are encrypted, and a subscriber only accepts a publisher that
holds the secret key matching the public key it was given (no one else can impersonate the robot).
What it does not give: subscribers are not authenticated; anyone who has the public key file can
subscribe. Keep the stream on a trusted network or behind a firewall if readers must be restricted.

pyzmq is imported only when keys are made or used, so ``import rrise`` does not need it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "CurveKeyError",
    "CurveKeys",
    "curve_client_options",
    "curve_server_options",
    "load_curve_public",
    "load_curve_secret",
    "write_curve_keypair",
]

log = logging.getLogger("rrise.curve")

_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_LINE = re.compile(r'^\s*(public-key|secret-key)\s*=\s*"?([^"]*)"?\s*$')


class CurveKeyError(ValueError):
    """A CURVE key file that cannot be written or read; the message names the file and says why."""


class CurveKeys(NamedTuple):
    """A z85-encoded key pair (40 ASCII bytes each)."""

    public: bytes
    secret: bytes


def _zmq() -> Any:
    try:
        import zmq
    except ImportError as exc:
        raise CurveKeyError("CURVE keys need pyzmq: pip install 'rrise[runtime]'") from exc
    if not zmq.has("curve"):
        raise CurveKeyError("this pyzmq's libzmq was built without CURVE support")
    return zmq


def _certificate(keys: CurveKeys, secret: bool) -> str:
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = (
        "#   ZeroMQ CURVE **Secret** Certificate\n"
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"
        if secret
        else "#   ZeroMQ CURVE Public Certificate\n"
        "#   Give this file to every subscriber (rrise subscribe --curve-server-key FILE).\n"
    )
    body = f'    public-key = "{keys.public.decode("ascii")}"\n'
    if secret:
        body += f'    secret-key = "{keys.secret.decode("ascii")}"\n'
    return f"#   ****  Generated on {when} by rrise  ****\n{head}\nmetadata\ncurve\n{body}"


def write_curve_keypair(prefix: str | Path) -> tuple[Path, Path]:
    """Make a CURVE key pair; write ``PREFIX.curve.pub`` and ``PREFIX.curve.key`` (secret, 0600).

    Returns ``(public_path, secret_path)``. Refuses (:class:`CurveKeyError`) to overwrite either
    file, and leaves neither behind when it fails.
    """
    zmq = _zmq()
    prefix = Path(prefix)
    pub_path = prefix.parent / f"{prefix.name}.curve.pub"
    key_path = prefix.parent / f"{prefix.name}.curve.key"
    for path in (pub_path, key_path):
        if path.exists():
            raise CurveKeyError(
                f"{path} exists; remove it or choose another prefix (keys are not overwritten)"
            )
    if not prefix.parent.is_dir():
        raise CurveKeyError(f"cannot write keys under {prefix}: folder {prefix.parent} does not exist")
    public, secret = zmq.curve_keypair()
    keys = CurveKeys(public, secret)
    written: list[Path] = []
    try:
        for path, is_secret in ((key_path, True), (pub_path, False)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if is_secret else 0o644)
            written.append(path)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(_certificate(keys, is_secret))
    except OSError as exc:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise CurveKeyError(
            f"cannot write CURVE keys {key_path}, {pub_path}: {exc.strerror or exc}"
        ) from None
    return pub_path, key_path


def _read_keys(path: str | Path) -> dict[str, bytes]:
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CurveKeyError(f"cannot read CURVE key file {path}: {reason}") from None
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        if not _Z85_KEY.match(m.group(2)):
            raise CurveKeyError(f"{path}: {m.group(1)} is not a 40-character z85 CURVE key")
        keys[m.group(1)] = m.group(2).encode("ascii")
    return keys


def load_curve_public(path: str | Path) -> bytes:
    """The z85 public key in ``path`` (a ``.curve.pub`` file; a ``.curve.key`` file holds it too)."""
    keys = _read_keys(path)
    if "public-key" not in keys:
        raise CurveKeyError(f"{path} holds no CURVE public-key (expected a file made by `rrise keys`)")
    return keys["public-key"]


def load_curve_secret(path: str | Path) -> CurveKeys:
    """The key pair in a secret key file (``.curve.key``); checks the public key matches the secret
    one and warns when the file is readable by other users."""
    zmq = _zmq()
    keys = _read_keys(path)
    if "secret-key" not in keys:
        raise CurveKeyError(
            f"{path} holds no CURVE secret-key: --curve-secret takes the .curve.key file, "
            "not the .curve.pub one"
        )
    public = zmq.curve_public(keys["secret-key"])
    if "public-key" in keys and keys["public-key"] != public:
        raise CurveKeyError(f"{path}: its public-key does not belong to its secret-key (file corrupted?)")
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning(
                "CURVE secret key %s is readable by other users (mode %04o): chmod 600 it", path, mode
            )
    return CurveKeys(public, keys["secret-key"])


def curve_server_options(secret_file: str | Path) -> dict[int, Any]:
    """Socket options that make a publisher a CURVE server with the key pair in ``secret_file``."""
    zmq = _zmq()
    keys = load_curve_secret(secret_file)
    return {zmq.CURVE_SERVER: 1, zmq.CURVE_PUBLICKEY: keys.public, zmq.CURVE_SECRETKEY: keys.secret}


def curve_client_options(server_key_file: str | Path) -> dict[int, Any]:
    """Socket options for a CURVE client of the server whose public key is in ``server_key_file``;
    the client's own key pair is made afresh (clients are not authenticated)."""
    zmq = _zmq()
    server = load_curve_public(server_key_file)
    public, secret = zmq.curve_keypair()
    return {zmq.CURVE_SERVERKEY: server, zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}
