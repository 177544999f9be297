"""What a bundle is known by: its canonical manifest and the sha256 of it, the bundle id.

The manifest lists the sha256 of every other file of the bundle, so the id changes when any byte of
the bundle does; a signature (:mod:`rrise.signing`) signs the same canonical bytes. Plain Python
(json, hashlib), below both :mod:`rrise.bundle` and :mod:`rrise.signing`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = ["canonical_manifest", "is_bundle_id", "manifest_id"]

_ID = re.compile(r"^[0-9a-f]{64}$")


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest as canonical JSON: what the bundle id digests and a signature signs.

    Parameters
    ----------
    manifest : dict
        A parsed ``manifest.json``.

    Returns
    -------
    bytes
        UTF-8 JSON with sorted keys and no whitespace; the same for any formatting of the file.

    Raises
    ------
    ValueError
        When the manifest holds NaN or infinity (not valid JSON).

    Examples
    --------
    >>> canonical_manifest({"b": 1, "a": [1.5, None]})
    b'{"a":[1.5,null],"b":1}'
    """
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def manifest_id(manifest: dict[str, Any]) -> str:
    """The bundle id: the sha256 (64 hex digits) of :func:`canonical_manifest`.

    Since the manifest lists the sha256 of every file, two bundles with the same id hold the same
    bytes.

    Parameters
    ----------
    manifest : dict
        A parsed ``manifest.json``.

    Returns
    -------
    str
        64 lower-case hex digits.

    Examples
    --------
    >>> manifest_id({"b": 1, "a": 2}) == manifest_id({"a": 2, "b": 1})
    True
    >>> len(manifest_id({"a": 1}))
    64
    """
    return hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def is_bundle_id(text: str) -> bool:
    """Whether ``text`` is written as a bundle id (64 lower-case hex digits).

    >>> is_bundle_id("0" * 64), is_bundle_id("xyz")
    (True, False)
    """
    return bool(_ID.match(text))
