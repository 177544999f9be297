"""An on-disk store of Monte Carlo class counts for a whole data set split: sharded, resumable.

Layout of a store folder::

    meta.json            what the counts are of (checked on resume; no timestamps)
    index.npy            int64 [N]: the data set indices, in store order
    shard-00000.npy      int64 [rows, K]: counts of store positions shard_size*s ... (one file per shard)
    manifest.json        written last, once every shard is there: sha256 of each file

Every file is written to a temporary name and renamed into place, so a crash (even ``kill -9``)
leaves whole shards or none. The arrays are plain ``np.save`` int64 files and the JSON is written
with sorted keys, so a store's bytes depend only on its contents: a resumed run, a sharded
multi-process run and an uninterrupted one give byte-identical folders. Input ``i`` of the store is
sampled with ``index_offset = i`` (its position), so its counts do not depend on the shard it falls in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import atomic_write_bytes, read_json
from rrise.progress import progress_bar

from .mc import sample_counts

__all__ = [
    "FORMAT",
    "CountStore",
    "IndexedRows",
    "StoreMismatchError",
    "StoreSpec",
    "discard",
    "fill_store",
    "is_store",
    "load_counts",
    "load_store",
]

FORMAT = "rrise.counts/1"
META_FIELDS = (
    "format",
    "base_sha256",
    "sigma",
    "n",
    "seed",
    "dataset",
    "split",
    "num_inputs",
    "num_classes",
    "shard_size",
    "index_sha256",
    "backend",
)


class StoreMismatchError(ValueError):
    """A store on disk was made with other settings than the ones asked for; ``field`` names the first."""

    def __init__(self, path: Path, field: str, have: Any, want: Any):
        self.field = field
        super().__init__(
            f"count store {path} was made with {field}={have!r}, this run asks for {field}={want!r}; "
            f"refusing to resume (use --no-resume or --force to start over, or another --workdir)"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a count store folder (has a ``meta.json`` of this format)."""
    meta = Path(path) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def discard(path: str | os.PathLike) -> bool:
    """Remove the count store at ``path`` (partial or complete); refuses any other folder."""
    path = Path(path)
    if not path.exists():
        return False
    if not is_store(path):
        raise ValueError(f"{path} is not a count store (no {FORMAT} meta.json); not removing it")
    shutil.rmtree(path)
    return True


def _check_existing(path: Path, meta: dict[str, Any], resume: bool) -> None:
    """Refuse (or with ``resume=False`` remove) a store at ``path`` made with other metadata."""
    if not (path.exists() and any(path.iterdir())):
        return
    if not is_store(path):
        raise ValueError(f"{path} exists and is not a count store; not writing into it")
    have = read_json(path / "meta.json")
    for key in META_FIELDS:
        if have.get(key) != meta[key]:
            if not resume:
                discard(path)
                return
            raise StoreMismatchError(path, key, have.get(key), meta[key])


@dataclass(frozen=True, kw_only=True)
class StoreSpec:
    """What a count store's counts are made with (its metadata, checked when it is reopened):
    ``n`` draws per input at ``sigma`` from ``seed``, ``num_classes`` classes, ``shard_size`` inputs
    per shard, the base model (``base_sha256``) on its ``backend``, and the images' ``dataset`` and
    ``split``."""

    n: int
    sigma: float
    seed: int
    num_classes: int
    shard_size: int
    base_sha256: str
    dataset: str
    split: str
    backend: str

    def __post_init__(self) -> None:
        if self.n < 1 or self.shard_size < 1 or self.num_classes < 2:
            raise ValueError(
                f"need n >= 1, shard_size >= 1, num_classes >= 2; got {self.n}, {self.shard_size}, "
                f"{self.num_classes}"
            )

    def meta(self, num_inputs: int, index_sha256: str) -> dict[str, Any]:
        """The store's ``meta.json`` for ``num_inputs`` inputs whose index hashes to ``index_sha256``."""
        return {
            "format": FORMAT,
            "base_sha256": str(self.base_sha256),
            "sigma": float(self.sigma),
            "n": int(self.n),
            "seed": int(self.seed),
            "dataset": str(self.dataset),
            "split": str(self.split),
            "num_inputs": num_inputs,
            "num_classes": int(self.num_classes),
            "shard_size": int(self.shard_size),
            "index_sha256": index_sha256,
            "backend": str(self.backend),
        }


class CountStore:
    """One split's counts on disk. Open with :meth:`open`; fill shard by shard with :meth:`write_shard`."""

    def __init__(self, path: Path, meta: dict[str, Any], index: np.ndarray):
        self.path = path
        self.meta = meta
        self.index = index

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        index: np.ndarray,
        spec: StoreSpec | None = None,
        *,
        resume: bool = True,
        clean: bool = True,
        **fields: Any,
    ) -> CountStore:
        """Create the store, or reopen it when every metadata field matches.

        ``spec`` (:class:`StoreSpec`), or its fields as keywords: what the counts are made with. A
        folder with other metadata raises :class:`StoreMismatchError` naming the first field that
        differs (with ``resume=False`` it is removed and started over instead). Leftover temporary
        files of an interrupted run are removed, unless ``clean=False``: a process that opens a
        store another one may already be writing (the other ranks of a multi-process run) must not
        take that writer's temporary files for leftovers.
        """
        spec = StoreSpec(**fields) if spec is None else replace(spec, **fields)
        path = Path(path)
        index = np.ascontiguousarray(np.asarray(index, dtype=np.int64))
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {index.shape}")
        index_bytes = _npy_bytes(index)
        meta = spec.meta(len(index), _sha256(index_bytes))
        _check_existing(path, meta, resume)
        path.mkdir(parents=True, exist_ok=True)
        if clean:
            for stale in (*path.glob(".tmp.*"), *path.glob(".*.tmp-*")):  # (the second: older versions)
                stale.unlink(missing_ok=True)
        if not (path / "meta.json").exists():
            atomic_write_bytes(path / "index.npy", index_bytes)
            atomic_write_bytes(path / "meta.json", _json_bytes(meta))
        return cls(path, meta, index)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CountStore:
        """Reopen an existing store as it is (no metadata expected)."""
        path = Path(path)
        if not is_store(path):
            raise FileNotFoundError(f"no count store at {path} (missing or foreign meta.json)")
        meta = read_json(path / "meta.json")
        index = np.load(path / "index.npy", allow_pickle=False)
        if _sha256(_npy_bytes(index)) != meta["index_sha256"]:
            raise ValueError(f"count store {path}: index.npy does not match meta.json")
        return cls(path, meta, index)

    # --- shards --------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.meta["num_inputs"] // self.meta["shard_size"])

    def bounds(self, shard: int) -> tuple[int, int]:
        """Store positions ``[lo, hi)`` of ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        size = self.meta["shard_size"]
        return shard * size, min((shard + 1) * size, self.meta["num_inputs"])

    def shard_path(self, shard: int) -> Path:
        return self.path / f"shard-{shard:05d}.npy"

    def has(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.has(s)]

    @property
    def complete(self) -> bool:
        return (self.path / "manifest.json").is_file()

    def write_shard(self, shard: int, counts: np.ndarray) -> Path:
        """Write one shard's ``[rows, K]`` counts atomically; checks shape, dtype and row sums."""
        lo, hi = self.bounds(shard)
        counts = np.asarray(counts)
        want = (hi - lo, self.meta["num_classes"])
        if counts.shape != want or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"shard {shard} needs integer counts of shape {want}, got {counts.dtype} {counts.shape}"
            )
        bad = np.flatnonzero(counts.sum(axis=1) != self.meta["n"])
        if bad.size:
            raise ValueError(f"shard {shard}: counts of store position {lo + int(bad[0])} do not sum to n")
        path = self.shard_path(shard)
        atomic_write_bytes(path, _npy_bytes(counts.astype(np.int64)))
        return path

    def read_shard(self, shard: int) -> np.ndarray:
        return np.load(self.shard_path(shard), allow_pickle=False)

    def finalize(self) -> Path:
        """Once every shard is there, write ``manifest.json`` (sha256 of each file): the store is complete."""
        missing = self.missing()
        if missing:
            raise ValueError(f"count store {self.path} is incomplete: shard(s) {missing[:10]} missing")
        files = ["index.npy", "meta.json", *(self.shard_path(s).name for s in range(self.num_shards))]
        manifest = {"files": {f: _sha256((self.path / f).read_bytes()) for f in files}}
        atomic_write_bytes(self.path / "manifest.json", _json_bytes(manifest))
        return self.path / "manifest.json"

    def counts(self) -> np.ndarray:
        """All ``[N, K]`` int64 counts, in store order; refuses an incomplete store."""
        missing = self.missing()
        if missing:
            raise ValueError(
                f"count store {self.path} is incomplete: {len(missing)} of {self.num_shards} shard(s) "
                f"missing (first: {missing[0]}); run `rrise targets` again to resume"
            )
        if self.num_shards == 0:
            return np.zeros((0, self.meta["num_classes"]), dtype=np.int64)
        return np.concatenate([self.read_shard(s) for s in range(self.num_shards)])


class IndexedRows:
    """``images[index]`` without the copy: slicing reads only the rows asked for (one shard at a time)."""

    def __init__(self, images, index: np.ndarray):
        self.images, self.index = images, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        return self.images[self.index[key]]


def load_store(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(index [N], counts [N, K] int64, meta)`` of a complete store."""
    store = CountStore.load(path)
    return store.index, store.counts(), dict(store.meta)


def load_counts(path: str | os.PathLike) -> np.ndarray:
    """The ``[N, K]`` int64 counts of a complete store (in the order of its ``index.npy``)."""
    return CountStore.load(path).counts()


def fill_store(
    store: CountStore,
    images,
    model,
    *,
    batch_size: int = 1000,
    shards: Iterable[int] | None = None,
    show_progress: bool = True,
    desc: str = "Monte Carlo",
) -> list[int]:
    """Sample the missing shards among ``shards`` (default: all) and write each as it finishes.

    ``images``: array-like ``[N, C, H, W]`` in store order (a memory map works: only one shard's
    inputs are read at a time, so peak memory does not grow with N). ``model``: whatever
    :func:`rrise.calibrate.mc.sample_counts` takes, best a :class:`~rrise.calibrate.mc.PreparedModel`
    matching ``store.meta["backend"]``. Returns the shards it sampled.
    """
    meta = store.meta
    if len(images) != meta["num_inputs"]:
        raise ValueError(f"store holds {meta['num_inputs']} inputs, got {len(images)} images")
    todo = [s for s in (range(store.num_shards) if shards is None else shards) if not store.has(s)]
    total = sum(store.bounds(s)[1] - store.bounds(s)[0] for s in todo) * meta["n"]
    with progress_bar(total, desc, "samples", enabled=show_progress) as bar:
        for s in todo:
            lo, hi = store.bounds(s)
            counts = sample_counts(
                model,
                np.asarray(images[lo:hi], dtype=np.float32),
                meta["n"],
                meta["sigma"],
                batch_size=batch_size,
                num_classes=meta["num_classes"],
                seed=meta["seed"],
                index_offset=lo,
                bar=bar,
            )
            store.write_shard(s, counts)
    return todo
