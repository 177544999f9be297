"""Ed25519 signatures of a bundle's manifest, kept beside it in ``manifest.sig``.

What is signed: the bytes ``b"rrise bundle manifest v1\\n"`` followed by the canonical manifest
(:func:`rrise.bundle_id.canonical_manifest`: sorted keys, no whitespace, UTF-8), whose sha256 is the
bundle id. The manifest lists the sha256 of every other file, so a valid signature vouches for every
byte of the bundle. ``manifest.sig`` is listed nowhere in the manifest: signing changes neither the
manifest nor the id, and re-signing replaces it.

``manifest.sig`` is a small JSON object: ``format`` (``rrise-signature``), ``version`` (1),
``algorithm`` (``ed25519``), ``key`` (the signer's key fingerprint: the first 16 hex digits of the
sha256 of its raw 32-byte public key), ``bundle`` (the id it was made for) and ``signature``
(base64 of the 64-byte signature). Only ``signature`` is trusted, and only after it verifies; the
other fields serve error messages.

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
    "read_signature",
    "verify_signature",
    "write_signature",
    "write_signing_keypair",
]

DOMAIN = b"rrise bundle manifest v1\n"
FORMAT = "rrise-signature"
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


def write_signature(
    bundle_dir: str | os.PathLike, manifest: dict[str, Any], key: Ed25519PrivateKey | str | os.PathLike
) -> Path:
    """Sign ``manifest`` with ``key`` (a key or its file) into ``bundle_dir/manifest.sig``, written
    atomically and replacing any older signature; returns its path. The caller vouches that the
    manifest is the bundle's, verified (:func:`rrise.bundle.sign_bundle` does both)."""
    private = key if not isinstance(key, (str, os.PathLike)) else load_private_key(key)
    signature = private.sign(DOMAIN + canonical_manifest(manifest))
    record = {
        "format": FORMAT,
        "version": 1,
        "algorithm": "ed25519",
        "key": key_fingerprint(private.public_key()),
        "bundle": manifest_id(manifest),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    path = Path(bundle_dir) / SIGNATURE
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    return path


@dataclass(frozen=True)
class SignatureInfo:
    """What ``manifest.sig`` claims (unverified): the signer's ``key`` fingerprint, the ``bundle``
    id it was made for and the raw ``signature``."""

    key: str
    bundle: str
    signature: bytes


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
        signature = base64.b64decode(str(record.get("signature")), validate=True)
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, this one {len(signature)}")
    except (ValueError, SigningError) as exc:  # JSONDecodeError and binascii.Error are ValueErrors
        raise SigningError(f"{path} is not an rrise Ed25519 signature: {exc}") from None
    return SignatureInfo(key=str(record.get("key")), bundle=str(record.get("bundle")), signature=signature)


def verify_signature(
    bundle: SignedBundle, trusted: Ed25519PublicKey | str | os.PathLike, *, manifest: dict | None = None
) -> str:
    """Check that ``manifest.sig`` of ``bundle`` is a valid signature by ``trusted`` (a key or its
    file) of its manifest; return the key's fingerprint.

    Guarantee: when this returns, the holder of the trusted private key signed exactly this manifest
    (every key and value, and so the sha256 of every file it lists). Raises for an
    unsigned bundle, a malformed signature, another signer, or a manifest changed since signing
    (SigningError; :meth:`rrise.Bundle.load` reports it as a BundleError)."""
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
        public.verify(info.signature, DOMAIN + canonical_manifest(manifest))
    except InvalidSignature:
        now = manifest_id(manifest)
        if info.key != fingerprint:
            why = f"it was signed by key {info.key}, not by the trusted key {fingerprint}"
        elif info.bundle != now:
            why = f"the manifest changed after it was signed (signed as bundle {info.bundle}, now {now})"
        else:
            why = "the signature does not match the manifest"
        raise SigningError(
            f"the signature of bundle {bundle.path} is not valid: {why}; refusing it"
        ) from None
    return fingerprint
