"""Files written whole or not at all, and arrays read without unpickling.

Every artefact the SDK writes (JSON records, ``.npz`` arrays, ONNX models, figures, checkpoints)
goes through :func:`atomic_path`: the content is written to a temp file in the destination's folder
and renamed into place, so a reader (or a crash) sees the old file or the whole new one, never a
partial write. Every ``.npz`` a user can hand the SDK is read by :func:`load_npz`, which never
unpickles. :func:`sha256_file` is the one file hasher (bundle files, model provenance, user data).
:func:`output_conflict` is the one check an output a run writes (``--record``, ``--save-video``)
passes before anything is written: it never overwrites, least of all the source being read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_npz",
    "output_conflict",
    "read_json",
    "save_npz",
    "sha256_file",
    "umask",
]


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    str
        64 lower-case hex digits.

    Raises
    ------
    OSError
        When the file cannot be read (FileNotFoundError when it does not exist).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...     _ = f.write(b"abc")
    >>> sha256_file(f.name)[:16]
    'ba7816bf8f01cfea'
    >>> os.unlink(f.name)
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_conflict(
    option: str, path: str | os.PathLike, sources: tuple[str | os.PathLike, ...] = ()
) -> str | None:
    """Why output ``path`` (given as ``option``) must not be written, or None: it exists already
    (nothing is overwritten: a file, a folder, or a link even when dangling), or it is one of
    ``sources`` (the input a run reads, compared by resolved path). One line naming the option.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
    ...     print(output_conflict("--save-video", f.name, (f.name,)).endswith("refusing to write over it"))
    True
    >>> output_conflict("--save-video", "no/such/folder/out.mp4") is None
    True
    """
    out = Path(path)
    if reads_source(out, sources):
        return f"{option} {path} is the source being read: refusing to write over it"
    if out.exists() or out.is_symlink():
        return f"{option} {path} exists already: give a new name (nothing is overwritten)"
    return None


def reads_source(path: str | os.PathLike, sources: tuple[str | os.PathLike, ...]) -> bool:
    """Whether ``path`` is one of ``sources`` (by resolved path, or the same file through a link)."""
    out = Path(path)
    target = out.resolve()
    for source in sources:
        src = Path(source)
        if src.exists() and (src.resolve() == target or (out.exists() and os.path.samefile(src, out))):
            return True
    return False


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without an error, fsync it and rename
    it to ``path``. On an error the temp file is removed and ``path`` is left as it was.

    ``suffix`` keeps writers that choose a format by extension (``np.savez``, ``savefig``) happy.
    The file gets the usual permissions (``0o666`` less the umask), not mkstemp's ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp.{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN and infinity are refused (not valid JSON)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write a compressed ``.npz`` atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(path)


def load_npz(
    path: str | os.PathLike | bytes, keys: tuple[str, ...] = (), what: str = ""
) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (a file, or its bytes: e.g. a bundle file read once and checked,
    :meth:`rrise.Bundle.read_verified`) as a dict, read with ``allow_pickle=False``.

    Raises ValueError, naming the file (and ``what`` it is for), when it is missing, unreadable,
    a single ``.npy`` array, holds object arrays, or lacks any of ``keys``.
    """
    if isinstance(path, bytes):
        source: Any = io.BytesIO(path)
        label = what or "the .npz bytes"
    else:
        source = Path(path)
        label = f"{what} {source}".strip()
        if not source.is_file():
            raise ValueError(f"{label} does not exist")
    try:
        z = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{label} is not a readable .npz file: {exc}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{label} is a single .npy array, not an .npz archive")
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"{label} lacks {', '.join(missing)} (has {', '.join(z.files) or 'nothing'})")
        try:
            return {k: z[k] for k in z.files}
        except ValueError as exc:  # object arrays need pickle: refused
            raise ValueError(f"{label} holds an array that needs unpickling: {exc}") from None
