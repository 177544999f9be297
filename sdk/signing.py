"""Ed25519 signatures of a bundle's manifest, kept beside it in ``manifest.sig``.

What is signed: the bytes ``b"rrise bundle manifest v1\\n"`` followed by the canonical manifest
(:func:`rrise.bundle_id.canonical_manifest`: sorted keys, no whitespace, UTF-8), whose sha256 is the
bundle id. The manifest lists the sha256 of every other file, so a valid signature vouches for every
byte of the bundle. ``manifest.sig`` is listed nowhere in the manifest: signing changes neither the
manifest nor the id, and re-signing replaces it.

``manifest.sig`` is a small JSON object: ``format`` (``rrise-signature``), ``version`` (1 or 2),
``algorithm`` (``ed25519``), ``key`` (the signer's key fingerprint: the first 16 hex digits of the
sha256 of its raw 32-byte public key), ``bundle`` (the id it was made for) and ``signature``
(base64 of the 64-byte signature). Only ``signature`` is trusted, and only after it verifies; the
other fields serve error messages.

Releases (version 2): an older bundle, validly signed, must not be accepted in place of a newer one
(a rollback), nor a bundle once its signer stopped vouching for it. A version-2 signature carries
``release`` (a non-negative integer the signer raises with each bundle it publishes) and, optionally,
``expires`` (a UTC time, ISO 8601, written ``YYYY-MM-DDTHH:MM:SSZ``), and signs them together with
the manifest: ``b"rrise bundle manifest v2\n"``, the canonical JSON of ``{"expires": …, "release":
…}``, ``b"\n"``, then the canonical manifest. They live in ``manifest.sig``, not in the manifest, so
signing still changes neither the manifest nor the bundle id (a pinned id keeps matching), and
re-signing with a higher release needs no re-export; a changed ``release`` or ``expires`` breaks the
signature. :func:`verify_signature` refuses, by name, an expired signature and, given
``min_release``, a lower release or a signature that carries none (version 1, made before releases
were numbered; it still verifies when no ``min_release`` is asked for).

Keys: PEM (PKCS#8 private, SubjectPublicKeyInfo public, as :func:`write_signing_keypair` writes and
``openssl genpkey -algorithm ed25519`` makes), OpenSSH ed25519 keys, or a raw 32-byte key file. The
``cryptography`` package is imported only when a key is used (extras ``runtime`` and ``export``).

This module works on a bundle's folder and manifest and never loads a bundle itself:
:func:`rrise.bundle.sign_bundle` verifies a bundle and signs it, and :meth:`rrise.Bundle.load` with
``trust`` checks the signature (turning a :class:`SigningError` into a ``BundleError``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .bundle_id import canonical_manifest, manifest_id
from .fileio import atomic_write_bytes
from .manifest_schema import SIGNATURE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "SIGNATURE",
    "SignatureInfo",
    "SigningError",
    "key_fingerprint",
    "load_private_key",
    "load_public_key",
    "parse_expiry",
    "read_signature",
    "verify_signature",
    "write_signature",
    "write_signing_keypair",
]

DOMAIN = b"rrise bundle manifest v1\n"
DOMAIN_V2 = b"rrise bundle manifest v2\n"
FORMAT = "rrise-signature"
MAX_RELEASE = 2**53 - 1  # what every JSON reader keeps exact
_MAX_KEY_BYTES = 1 << 16


class SigningError(ValueError):
    """A key file that cannot be used, a key that cannot be written, or a signature that is malformed
    or does not verify; the message names the file or says what differs."""


class SignedBundle(Protocol):
    """What signing reads of a bundle: its folder and its manifest (an :class:`rrise.Bundle` is one)."""

    path: Path
    manifest: dict[str, Any]


def _crypto():
    """cryptography's serialization and ed25519 modules, or SigningError saying how to install it."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SigningError(
            "bundle signatures need the cryptography package: pip install 'rrise[runtime]'"
        ) from None
    return serialization, ed25519


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, role: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise SigningError(f"cannot read {role} {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_BYTES:
        raise SigningError(f"{role} {path} is not a key file (larger than {_MAX_KEY_BYTES} bytes)")
    return data


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (PEM, OpenSSH or raw 32 bytes); SigningError otherwise."""
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm

    path = Path(path)
    data = _read_key_file(path, "signing key")
    if len(data) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(data)
    if b"PUBLIC KEY" in data or data.startswith(b"ssh-ed25519 "):
        raise SigningError(f"{path} is a public key; signing needs the private key (the .key file)")
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's word for "this key needs a password"
        raise SigningError(f"signing key {path} is encrypted; rrise reads unencrypted keys only") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{path} is not a PEM, OpenSSH or raw 32-byte private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{path} is a {type(key).__name__}; rrise signs with Ed25519 keys (rrise keys)")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """The Ed25519 public key in ``path`` (PEM, OpenSSH or raw 32 bytes); SigningError otherwise."""
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm

    path = Path(path)
    data = _read_key_file(path, "trusted key")
    if len(data) == 32:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY" in data:
        raise SigningError(f"{path} is a private key; --trust takes the public key (the .pub file)")
    try:
        if data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{path} is not a PEM, OpenSSH or raw 32-byte public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{path} is a {type(key).__name__}; rrise verifies Ed25519 keys only")
    return key


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with ``mode``; refuse to replace one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SigningError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise SigningError(f"cannot write {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # whatever the umask


def write_signing_keypair(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """A new Ed25519 key pair; returns ``(public_path, private_path)``: ``PREFIX.pub``
    (SubjectPublicKeyInfo PEM, for every machine that checks bundles) and ``PREFIX.key`` (PKCS#8
    PEM, mode 0600, for the machine that signs). Refuses to overwrite either, and leaves neither
    behind when it fails."""
    serialization, ed25519 = _crypto()
    prefix = Path(prefix)
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise SigningError(f"{p} already exists; refusing to overwrite a key")
    if not key_path.parent.is_dir():
        raise SigningError(f"folder {key_path.parent} does not exist")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create(key_path, private_pem, 0o600)
    try:
        _create(pub_path, public_pem, 0o644)
    except SigningError:
        key_path.unlink()
        raise
    return pub_path, key_path


def parse_expiry(value: str | datetime) -> datetime:
    """An expiry time as an aware UTC datetime, whole seconds: a timezone-aware datetime, or ISO 8601
    text with its offset (``2027-01-31T00:00:00Z``, ``2027-01-31T02:00:00+02:00``). ValueError for
    anything else, a time without a timezone included (it would mean another instant on each device).

    >>> parse_expiry("2027-01-31T02:00:00+02:00").isoformat()
    '2027-01-31T00:00:00+00:00'
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"expiry {value!r} is not an ISO 8601 time such as 2027-01-31T00:00:00Z"
            ) from None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"expiry {value!r} has no timezone: give it in UTC, e.g. 2027-01-31T00:00:00Z")
    return value.astimezone(timezone.utc).replace(microsecond=0)


def _expiry_text(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_release(release: Any) -> int:
    if isinstance(release, bool) or not isinstance(release, int) or not 0 <= release <= MAX_RELEASE:
        raise ValueError(f"release must be an integer in [0, {MAX_RELEASE}], got {release!r}")
    return release


def _signed_bytes(manifest: dict[str, Any], version: int, release: int | None, expires: str | None) -> bytes:
    """What a signature of ``version`` signs (see the module docstring)."""
    if version == 1:
        return DOMAIN + canonical_manifest(manifest)
    meta = json.dumps({"expires": expires, "release": release}, sort_keys=True, separators=(",", ":"))
    return DOMAIN_V2 + meta.encode("ascii") + b"\n" + canonical_manifest(manifest)


def write_signature(
    bundle_dir: str | os.PathLike,
    manifest: dict[str, Any],
    key: Ed25519PrivateKey | str | os.PathLike,
    *,
    release: int | None = None,
    expires: str | datetime | None = None,
) -> Path:
    """Sign ``manifest`` with ``key`` (a key or its file) into ``bundle_dir/manifest.sig``, written
    atomically and replacing any older signature; returns its path. The caller vouches that the
    manifest is the bundle's, verified (:func:`rrise.bundle.sign_bundle` does both).

    ``release`` (an integer, raised with each bundle published) and ``expires`` (UTC, ISO 8601, or an
    aware datetime) make a version-2 signature that covers them too; without either it is version 1.
    ValueError for a release or expiry that is not one.
    """
    if release is not None:
        _check_release(release)
    expiry = None if expires is None else _expiry_text(parse_expiry(expires))
    version = 1 if release is None and expiry is None else 2
    private = key if not isinstance(key, (str, os.PathLike)) else load_private_key(key)
    signature = private.sign(_signed_bytes(manifest, version, release, expiry))
    record: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "algorithm": "ed25519",
        "key": key_fingerprint(private.public_key()),
        "bundle": manifest_id(manifest),
    }
    if version == 2:
        record.update(release=release, expires=expiry)
    record["signature"] = base64.b64encode(signature).decode("ascii")
    path = Path(bundle_dir) / SIGNATURE
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return path


@dataclass(frozen=True)
class SignatureInfo:
    """What ``manifest.sig`` claims (unverified): the signer's ``key`` fingerprint, the ``bundle``
    id it was made for, the raw ``signature``, its ``version`` and, in a version-2 signature, the
    ``release`` number and the ``expires`` time (UTC ISO 8601) it signs."""

    key: str
    bundle: str
    signature: bytes
    version: int = 1
    release: int | None = None
    expires: str | None = None


def read_signature(bundle_dir: str | os.PathLike) -> SignatureInfo | None:
    """The bundle's ``manifest.sig`` as it claims to be (None when there is none). Raises
    SigningError when it is not an rrise Ed25519 signature."""
    path = Path(bundle_dir) / SIGNATURE
    if not path.is_file():
        return None
    try:
        record: Any = json.loads(_read_key_file(path, "signature"))
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        if record.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {record.get('algorithm')!r} is not 'ed25519'")
        version = record.get("version", 1)
        if version not in (1, 2) or isinstance(version, bool):
            raise ValueError(f"version {version!r} is not 1 or 2")
        release, expires = record.get("release"), record.get("expires")
        if version == 2:
            release = None if release is None else _check_release(release)
            expires = None if expires is None else _expiry_text(parse_expiry(str(expires)))
        elif release is not None or expires is not None:
            raise ValueError("a version-1 signature signs no release or expiry")
        signature = base64.b64decode(str(record.get("signature")), validate=True)
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, this one {len(signature)}")
    except (ValueError, SigningError) as exc:  # JSONDecodeError and binascii.Error are ValueErrors
        raise SigningError(f"{path} is not an rrise Ed25519 signature: {exc}") from None
    return SignatureInfo(
        key=str(record.get("key")),
        bundle=str(record.get("bundle")),
        signature=signature,
        version=version,
        release=release,
        expires=expires,
    )


def verify_signature(
    bundle: SignedBundle,
    trusted: Ed25519PublicKey | str | os.PathLike,
    *,
    manifest: dict | None = None,
    min_release: int | None = None,
    now: datetime | None = None,
) -> str:
    """Check that ``manifest.sig`` of ``bundle`` is a valid signature by ``trusted`` (a key or its
    file) of its manifest, not expired at ``now`` (default: the current time) and, given
    ``min_release``, of a release at least that; return the key's fingerprint.

    Guarantee: when this returns, the holder of the trusted private key signed exactly this manifest
    (every key and value, and so the sha256 of every file it lists), with the release number and
    expiry the signature states. Raises for an unsigned bundle, a malformed signature, another
    signer, a manifest changed since signing, an expired signature, or a release lower than
    ``min_release`` or none at all (SigningError; :meth:`rrise.Bundle.load` reports it as a
    BundleError)."""
    if min_release is not None:
        _check_release(min_release)
    public = trusted if not isinstance(trusted, (str, os.PathLike)) else load_public_key(trusted)
    fingerprint = key_fingerprint(public)
    from cryptography.exceptions import InvalidSignature

    info = read_signature(bundle.path)
    if info is None:
        raise SigningError(
            f"bundle {bundle.path} is not signed (no {SIGNATURE}), but only bundles signed by key "
            f"{fingerprint} are trusted: refusing it"
        )
    manifest = bundle.manifest if manifest is None else manifest
    try:
        public.verify(info.signature, _signed_bytes(manifest, info.version, info.release, info.expires))
    except InvalidSignature:
        now_id = manifest_id(manifest)
        if info.key != fingerprint:
            why = f"it was signed by key {info.key}, not by the trusted key {fingerprint}"
        elif info.bundle != now_id:
            why = f"the manifest changed after it was signed (signed as bundle {info.bundle}, now {now_id})"
        else:
            why = "the signature does not match the manifest and the release it states"
        raise SigningError(
            f"the signature of bundle {bundle.path} is not valid: {why}; refusing it"
        ) from None
    _check_freshness(bundle.path, info, min_release, now)
    return fingerprint


def _check_freshness(path: Path, info: SignatureInfo, min_release: int | None, now: datetime | None) -> None:
    """Refuse (SigningError, by name) a verified signature that has expired or whose release is
    below ``min_release``."""
    when = datetime.now(timezone.utc) if now is None else parse_expiry(now)
    if info.expires is not None and when >= parse_expiry(info.expires):
        raise SigningError(
            f"the signature of bundle {path} expired at {info.expires} (release {info.release}): "
            "its signer no longer vouches for it; refusing it"
        )
    if min_release is None:
        return
    if info.release is None:
        raise SigningError(
            f"bundle {path} carries no signed release number (signed before releases were numbered), "
            f"but release {min_release} or later is required: refusing it"
        )
    if info.release < min_release:
        raise SigningError(
            f"bundle {path} is release {info.release}, older than the lowest release accepted "
            f"({min_release}): refusing it (a rollback to an older bundle)"
        )
