"""The work folder's Monte Carlo count stores: which inputs, how many draws, sampled on which backend.

Each store (:mod:`rrise.calibrate.store`) holds the base model's class counts for one set of inputs
and records the sha256 of the ``base.onnx`` it sampled. Under ``torchrun`` every rank samples its
share of the shards and rank 0 merges them: the store is byte-identical to a single-process run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rrise.fileio import read_json

from . import distributed as dist
from .mc import AUTO_PROBE_MIN_DRAWS, prepare_model
from .model_files import load_model
from .provenance import file_sha256
from .store import CountStore, IndexedRows, fill_store, is_store, load_store
from .workdir import Workdir

__all__ = [
    "CALIBRATION_STORE",
    "CAP_STORE",
    "REFERENCE_STORE",
    "RULE_CAP_STORE",
    "RULE_STORE",
    "TARGET_STORES",
    "fill_count_store",
    "load_store_counts",
    "mc_shard_size",
    "prepare_base_model",
    "stage_reference",
    "stage_targets",
]

# Count stores, relative to the work folder.
TARGET_STORES = {"targets": "targets/train", "selection": "targets/selection"}  # `rrise targets`
CALIBRATION_STORE = "calibration_counts"  # `rrise calibrate`: N_cal draws on the calibration inputs
# `rrise calibrate` with cap draws: N₂ more draws on the calibration inputs whose N_cal all fell on one class
CAP_STORE = "calibration_cap_counts"
RULE_STORE = "selection_counts"  # `rrise select-rule`: N_cal draws on the rule-selection inputs
# `rrise select-rule` with cap draws: N₂ more draws on the rule-selection inputs at the cap
RULE_CAP_STORE = "selection_cap_counts"
REFERENCE_STORE = "reference_counts"  # `rrise reference`: N_ref draws on the first test inputs


def mc_shard_size(num_inputs: int) -> int:
    """Inputs per store shard: about 16 shards (work for up to 16 ranks), 16 to 1024 inputs each."""
    return int(min(1024, max(16, -(-num_inputs // 16))))


def prepare_base_model(w: Workdir, backend: str, device: str, sample: np.ndarray, draws: int):
    """The base model bound to a Monte Carlo backend, and that backend's label for a store's metadata
    (``onnxruntime``, ``torch:cpu`` or ``torch:cuda``).

    ``backend="auto"`` leaves the choice to :func:`rrise.calibrate.mc.prepare_model` (torch on a GPU;
    on a CPU the faster of torch and ``base.onnx`` on a timed probe), except that a CPU job of fewer
    than ``AUTO_PROBE_MIN_DRAWS`` draws runs ``base.onnx`` without a probe: the probe would cost more
    than it saves, and onnxruntime is the faster one for small models on a CPU. A label reopens the
    backend a store was sampled with, so that a resumed store keeps its numerics.
    """
    if backend == "auto" and not w.config.model_spec.torch_checkpoint:  # base.onnx is all there is
        backend = "onnxruntime"
    if backend == "auto" and draws < AUTO_PROBE_MIN_DRAWS and not device.startswith("cuda"):
        backend = "onnxruntime"
    if backend == "onnxruntime":
        prepared = prepare_model(str(w.path("base.onnx")), "onnxruntime")
    elif backend in ("auto", "torch:cpu", "torch:cuda"):
        if backend == "torch:cuda" and not device.startswith("cuda"):
            raise ValueError("this store was sampled with backend='torch:cuda' and this machine has no GPU")
        if backend == "torch:cpu":
            device = "cpu"
        model = load_model(w.path("base.pt"))[0].to(device)
        choice = "auto" if backend == "auto" else "torch"
        prepared = prepare_model(
            model, choice, sample=sample, onnx=w.path("base.onnx"), batch_size=w.prof.batch_size
        )
    else:
        raise ValueError(f"unknown Monte Carlo backend {backend!r}")
    label = "onnxruntime" if prepared.backend == "onnxruntime" else f"torch:{prepared.device_type}"
    if prepared.probe:
        w.log(f"[mc] backend {prepared.label}")
    return prepared, label


def fill_count_store(
    w: Workdir, name: str, index: np.ndarray, n: int, stream: str, split: str, resume: bool = True
) -> Path:
    """Fill the count store ``name`` with ``n`` draws per input of ``w.data(split)[index]``.

    ``resume``: continue a store whose metadata matches, refuse (naming the field) one made otherwise;
    ``resume=False`` starts such a store over. Returns the store's ``manifest.json``.
    """
    info, device = dist.init()
    ds, path = w.data(split), w.path(name)
    images = IndexedRows(ds.images, index)
    prepared = None

    def open_store(label: str | None) -> CountStore:
        nonlocal prepared
        if label is None and resume and is_store(path):
            label = (read_json(path / "meta.json") or {}).get("backend")
        if label is None:
            prepared, label = prepare_base_model(w, "auto", device, images[:1], len(index) * n)
        return CountStore.open(
            path,
            index,
            n=n,
            sigma=w.config.sigma,
            seed=w.seed(stream),
            num_classes=len(ds.classes),
            shard_size=mc_shard_size(len(index)),
            base_sha256=file_sha256(w.path("base.onnx")),
            dataset=w.config.dataset,
            split=split,
            backend=label,
            resume=resume,
            clean=info.is_main,  # rank 0 may be writing its first shard while the others open it
        )

    store = dist.run_on_rank0_first(info, lambda: open_store(None) if info.is_main else None)
    label = dist.broadcast(info, store.meta["backend"] if info.is_main else None)
    if not info.is_main:
        store = open_store(label)
    shards = dist.assign_shards(store.num_shards, info.rank, info.world_size)
    if any(not store.has(s) for s in shards):
        if prepared is None:
            prepared, _ = prepare_base_model(w, label, device, images[:1], len(index) * n)
        desc = f"MC {name}" + (f" (rank {info.rank}/{info.world_size})" if info.distributed else "")
        fill_store(
            store,
            images,
            prepared,
            batch_size=w.prof.batch_size,
            shards=shards,
            show_progress=w.show_progress and info.is_main,
            desc=desc,
        )
    dist.merge(info, store)
    return path / "manifest.json"


def load_store_counts(w: Workdir, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(index [N], counts [N, K] int64)`` of the finished count store ``name`` of the work folder."""
    index, counts, _ = load_store(w.path(name))
    return index, counts


def stage_targets(w: Workdir, resume: bool = True) -> list[Path]:
    """Monte Carlo class counts of the base model for the surrogate's training and selection inputs."""
    sp, p = w.splits(), w.prof
    return [
        fill_count_store(w, TARGET_STORES[part], sp[part], p.target_draws, part, "train", resume)
        for part in ("targets", "selection")
    ]


def stage_reference(w: Workdir, resume: bool = True) -> list[Path]:
    """High-budget reference MC (N_ref draws) on the first test inputs, for violation rates."""
    p = w.prof
    index = w.folder_data().first_inputs("test", p.n_ref_inputs)
    return [fill_count_store(w, REFERENCE_STORE, index, p.n_ref, "reference", "test", resume)]
