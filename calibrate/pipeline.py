"""The stages wired over one work folder; each stage resumes by skipping finished outputs.

Data splits (fixed by the seed, disjoint by construction): the base model trains on ``base``; the
surrogate's Monte Carlo targets come from the first ``n_targets`` of ``base``; ``selection`` (model
selection only) and ``calibration`` are held out of both; the test inputs come from the test split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import GUARANTEE, sha256_file
from rrise.certificate import Calibration, certify_from_probs
from rrise.datasets import Dataset, load_dataset

from .profiles import Profile, get_profile

__all__ = ["RunConfig", "Workdir", "STAGES", "run_stage", "run_demo"]

SEED_STREAMS = {"targets": 1, "selection": 2, "calibration": 3, "certify": 4, "rules": 5, "reference": 6}


@dataclass(frozen=True)
class RunConfig:
    """What a work folder was made with; a resumed stage refuses a folder made otherwise."""

    dataset: str = "fashion-mnist"
    profile: str = "quick"
    sigma: float = 0.25
    seed: int = 0
    data_dir: str | None = None

    @property
    def prof(self) -> Profile:
        return get_profile(self.profile, self.dataset)


@dataclass
class Workdir:
    root: Path
    config: RunConfig
    show_progress: bool = True
    log: Callable[[str], None] = print
    _data: dict[str, Dataset] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | os.PathLike, config: RunConfig, **kw: Any) -> Workdir:
        """Create or reopen ``root``; refuse to mix a folder's outputs with another configuration."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "run.json"
        wanted = {k: getattr(config, k) for k in ("dataset", "profile", "sigma", "seed")}
        if meta.exists():
            have = json.loads(meta.read_text()).get("config", {})
            diff = [
                f"{k}: folder has {have.get(k)!r}, asked for {v!r}"
                for k, v in wanted.items()
                if have.get(k) != v
            ]
            if diff:
                raise ValueError(
                    f"{root} was made with another configuration ({'; '.join(diff)}); use another --workdir"
                )
        else:
            _write_json(meta, {"config": wanted, "stage_seconds": {}})
        return cls(root=root, config=config, **kw)

    # --- paths ----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def prof(self) -> Profile:
        return self.config.prof

    # --- data -----------------------------------------------------------------------------
    def data(self, split: str) -> Dataset:
        if split not in self._data:
            self._data[split] = load_dataset(self.config.dataset, split, self.config.data_dir)
        return self._data[split]

    def splits(self) -> dict[str, np.ndarray]:
        p = self.prof
        n_train = len(self.data("train"))
        need = p.base_train_size + p.n_selection + p.m
        if need > n_train:
            raise ValueError(
                f"profile {p.name!r} needs {need} training images, {self.config.dataset} has {n_train}"
            )
        perm = np.random.default_rng(self.config.seed).permutation(n_train)
        base = np.sort(perm[: p.base_train_size])
        sel = np.sort(perm[p.base_train_size : p.base_train_size + p.n_selection])
        cal = np.sort(perm[n_train - p.m :])
        test = np.sort(
            np.random.default_rng(self.config.seed + 1).permutation(len(self.data("test")))[: p.n_test]
        )
        return {
            "base": base,
            "targets": base[: p.n_targets],
            "selection": sel,
            "rules": sel[: p.n_rule],
            "calibration": cal,
            "test": test,
        }

    def seed(self, stream: str) -> int:
        return 1000 * self.config.seed + SEED_STREAMS[stream]

    # --- bookkeeping ----------------------------------------------------------------------
    def record_seconds(self, stage: str, seconds: float) -> None:
        meta = json.loads(self.path("run.json").read_text())
        meta.setdefault("stage_seconds", {})[stage] = round(seconds, 2)
        _write_json(self.path("run.json"), meta)

    def stage_seconds(self) -> dict[str, float]:
        return json.loads(self.path("run.json").read_text()).get("stage_seconds", {})


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (several torchrun ranks may write the same file at once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _save_npz(path: Path, **arrays: Any) -> None:
    """Write an .npz atomically: a crash leaves the old file or none, never half a file."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _model_spec(w: Workdir) -> dict[str, Any]:
    ds = w.data("train")
    c, h, _ = ds.shape
    imgs = ds.images[w.splits()["base"]]
    return {
        "in_channels": c,
        "num_classes": len(ds.classes),
        "image_size": h,
        "mean": [float(imgs[:, i].mean()) for i in range(c)],
        "std": [float(imgs[:, i].std()) for i in range(c)],
    }


# --- stages ---------------------------------------------------------------------------------
def stage_train_base(w: Workdir) -> list[Path]:
    """Train the base classifier with Gaussian noise augmentation; write base.pt and base.onnx."""
    from rrise.export.onnx_export import export_onnx

    from .models import build_model, save_model
    from .train import train_base

    ds, idx, p = w.data("train"), w.splits()["base"], w.prof
    spec = _model_spec(w)
    model = build_model(p.base_arch, seed=w.config.seed, **spec)
    train_base(
        model,
        ds.images[idx],
        ds.labels[idx],
        sigma=w.config.sigma,
        epochs=p.base_epochs,
        seed=w.config.seed,
        show_progress=w.show_progress,
    )
    save_model(
        model,
        w.path("base.pt"),
        arch=p.base_arch,
        **spec,
        labels=ds.classes,
        dataset=w.config.dataset,
        sigma=w.config.sigma,
    )
    export_onnx(model, w.path("base.onnx"), ds.shape)
    return [w.path("base.pt"), w.path("base.onnx")]


# Count stores written by `rrise targets` (and `rrise calibrate`), relative to the work folder.
TARGET_STORES = {"targets": "targets/train", "selection": "targets/selection"}
CALIBRATION_STORE = "calibration_counts"
RULE_STORE = "selection_counts"
REFERENCE_STORE = "reference_counts"


def mc_shard_size(num_inputs: int) -> int:
    """Inputs per store shard: about 16 shards (work for up to 16 ranks), 16 to 1024 inputs each."""
    return int(min(1024, max(16, -(-num_inputs // 16))))


def _mc_backend(w: Workdir, sample: np.ndarray, draws: int, device: str) -> str:
    """The backend a new store is sampled with: torch on a GPU; else the faster of torch and
    onnxruntime on this CPU (timed on a short probe), or onnxruntime for jobs too small to time."""
    from .mc import AUTO_PROBE_MIN_DRAWS, prepare_model
    from .models import load_model

    if device.startswith("cuda"):
        return "torch:cuda"
    if draws < AUTO_PROBE_MIN_DRAWS:
        return "onnxruntime"
    model, _ = load_model(w.path("base.pt"))
    prepared = prepare_model(
        model, "auto", sample=sample, onnx=w.path("base.onnx"), batch_size=w.prof.batch_size
    )
    w.log(f"[mc] backend {prepared.label}")
    return "onnxruntime" if prepared.backend == "onnxruntime" else "torch:cpu"


def _mc_model(w: Workdir, backend: str, device: str):
    """The base model bound to ``backend`` (as recorded in a store's metadata)."""
    from .mc import PreparedModel, prepare_model
    from .models import load_model

    if backend == "onnxruntime":
        return prepare_model(str(w.path("base.onnx")), "onnxruntime")
    if backend in ("torch:cpu", "torch:cuda"):
        if backend == "torch:cuda" and not device.startswith("cuda"):
            raise ValueError("this store was sampled with backend='torch:cuda' and this machine has no GPU")
        model, _ = load_model(w.path("base.pt"))
        return PreparedModel("torch", model.to(device if backend == "torch:cuda" else "cpu").eval())
    raise ValueError(f"unknown Monte Carlo backend {backend!r}")


def _mc_counts(
    w: Workdir, name: str, index: np.ndarray, n: int, stream: str, split: str, resume: bool = True
) -> Path:
    """Fill the count store ``name`` with ``n`` draws per input of ``w.data(split)[index]``.

    Under ``torchrun`` every rank samples its share of the shards and rank 0 merges them; the store
    is byte-identical to a single-process run. Returns the store's ``manifest.json``.
    """
    from . import distributed as dist
    from .store import CountStore, IndexedRows, fill_store, is_store

    info, device = dist.init()
    ds, path = w.data(split), w.path(name)
    images = IndexedRows(ds.images, index)
    base_sha = sha256_file(w.path("base.onnx"))

    def open_store(backend: str | None) -> CountStore:
        if backend is None and resume and is_store(path):
            backend = json.loads((path / "meta.json").read_text()).get("backend")
        if backend is None:
            backend = _mc_backend(w, images[:1], len(index) * n, device)
        return CountStore.open(
            path,
            index,
            n=n,
            sigma=w.config.sigma,
            seed=w.seed(stream),
            num_classes=len(ds.classes),
            shard_size=mc_shard_size(len(index)),
            base_sha256=base_sha,
            dataset=w.config.dataset,
            split=split,
            backend=backend,
            resume=resume,
        )

    store = dist.run_on_rank0_first(info, lambda: open_store(None) if info.is_main else None)
    backend = dist.broadcast(info, store.meta["backend"] if info.is_main else None)
    if not info.is_main:
        store = open_store(backend)
    shards = dist.assign_shards(store.num_shards, info.rank, info.world_size)
    if any(not store.has(s) for s in shards):
        desc = f"MC {name}" + (f" (rank {info.rank}/{info.world_size})" if info.distributed else "")
        fill_store(
            store,
            images,
            _mc_model(w, backend, device),
            batch_size=w.prof.batch_size,
            shards=shards,
            show_progress=w.show_progress and info.is_main,
            desc=desc,
        )
    dist.merge(info, store)
    return path / "manifest.json"


def stage_targets(w: Workdir, resume: bool = True) -> list[Path]:
    """Monte Carlo class counts of the base model for the surrogate's training and selection inputs."""
    sp, p = w.splits(), w.prof
    return [
        _mc_counts(w, TARGET_STORES[part], sp[part], p.target_draws, part, "train", resume)
        for part in ("targets", "selection")
    ]


def load_targets(w: Workdir, part: str) -> dict[str, np.ndarray]:
    """A finished count store as ``{"index", "counts"}``: ``part`` is ``targets``, ``selection`` or
    ``calibration`` (what the later stages read)."""
    from .store import load_store

    name = CALIBRATION_STORE if part == "calibration" else TARGET_STORES[part]
    index, counts, _ = load_store(w.path(name))
    return {"index": index, "counts": counts}


def run_targets(w: Workdir, force: bool = False, resume: bool = True) -> list[Path]:
    """`rrise targets`, also under ``torchrun``: ``force`` or ``resume=False`` start the stores over;
    by default a partial store is resumed when its metadata matches, and refused (naming the field
    that differs) when it does not."""
    from . import distributed as dist
    from .store import discard

    info, _ = dist.init()
    try:
        if info.is_main and (force or not resume):
            for name in TARGET_STORES.values():
                discard(w.path(name))
        outputs = [w.path(o) for o in STAGES["targets"][1]]
        done = dist.broadcast(info, all(o.exists() for o in outputs) and not force)
        if info.is_main:
            return run_stage(w, "targets", force=force)
        return outputs if done else stage_targets(w, resume=True)
    finally:
        dist.shutdown()


def _fit_surrogate(
    w: Workdir, loss: str, stem: str, arch: str | None = None, augment: str | None = None
) -> list[Path]:
    """Train a surrogate on the MC targets: from the base model's weights (``arch="base"``, the
    profile's default) or a fresh architecture; checkpointed every epoch and resumed after a crash."""
    from rrise.export.onnx_export import export_onnx

    from .models import ARCHS, build_model, load_model, save_model
    from .train import train_surrogate

    ds, p = w.data("train"), w.prof
    tr, sel = load_targets(w, "targets"), load_targets(w, "selection")
    spec = _model_spec(w)
    arch = arch or p.surrogate_arch
    augment = augment or p.surrogate_augment
    if arch == "base":
        model, _ = load_model(w.path("base.pt"))
        arch = p.base_arch
    elif arch in ARCHS:
        model = build_model(arch, seed=w.config.seed, **spec)
    else:
        raise ValueError(f"unknown surrogate arch {arch!r}; expected base or one of {', '.join(ARCHS)}")
    ckpt = w.path(f"{stem}.ckpt")
    model, history = train_surrogate(
        model,
        ds.images[tr["index"]],
        tr["counts"],
        epochs=p.surrogate_epochs,
        seed=w.config.seed,
        val_images=ds.images[sel["index"]],
        val_counts=sel["counts"],
        show_progress=w.show_progress,
        loss=loss,
        augment=augment,
        checkpoint=ckpt,
    )
    save_model(
        model,
        w.path(f"{stem}.pt"),
        arch=arch,
        **spec,
        labels=ds.classes,
        dataset=w.config.dataset,
        sigma=w.config.sigma,
        history=history,
        loss=loss,
        augment=augment,
    )
    export_onnx(model, w.path(f"{stem}.onnx"), ds.shape)
    ckpt.unlink(missing_ok=True)  # the finished model supersedes it
    return [w.path(f"{stem}.pt"), w.path(f"{stem}.onnx")]


def stage_train_surrogate(w: Workdir, arch: str | None = None, augment: str | None = None) -> list[Path]:
    """Fit the surrogate to counts/N (soft-label cross-entropy), selected by held-out KL."""
    return _fit_surrogate(w, "ce", "surrogate", arch, augment)


def stage_train_baseline(w: Workdir) -> list[Path]:
    """Fit the Accelerated Smoothing baseline: the same surrogate trained with Jensen–Shannon loss."""
    return _fit_surrogate(w, "js", "baseline_js")


def surrogate_probs(onnx_path: Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Surrogate probabilities through onnxruntime: the exact numerics the fp32 variant deploys with."""
    from rrise.runtime.backends import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx_path)
    return np.concatenate(
        [backend.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    ).astype(np.float64)


def selection_data(w: Workdir) -> dict[str, np.ndarray]:
    """What calibration rules are fitted on, all from the selection split: ``bin_probs`` (the
    surrogate on every selection input: bin edges need only ŝ) and, once ``select-rule`` has sampled
    them, ``probs``, ``counts`` (full-size MC) and ``labels`` of the rule-selection inputs."""
    from .store import load_store

    ds = w.data("train")
    out = {"bin_probs": surrogate_probs(w.path("surrogate.onnx"), ds.images[w.splits()["selection"]])}
    if w.prof.n_rule and (w.path(RULE_STORE) / "manifest.json").exists():
        index, counts, _ = load_store(w.path(RULE_STORE))
        out.update(
            probs=surrogate_probs(w.path("surrogate.onnx"), ds.images[index]),
            counts=counts,
            labels=ds.labels[index],
        )
    return out


def stage_select_rule(w: Workdir) -> list[Path]:
    """Choose the calibration rule on the selection split (full-size MC there; never calibration)."""
    from .rules import compare_rules

    p = w.prof
    out = w.path("rules.json")
    if not p.n_rule:
        _write_json(out, {"winner": "single", "note": f"profile {p.name!r} has no rule-selection inputs"})
        return [out]
    _mc_counts(w, RULE_STORE, w.splits()["rules"], p.n_cal, "rules", "train")
    data = selection_data(w)
    result = compare_rules(
        data["probs"],
        data["counts"],
        data["labels"],
        n_mc=p.n_cal,
        sigma=w.config.sigma,
        alpha=p.alphas[0],
        beta=p.beta,
        seed=w.config.seed,
    )
    _write_json(out, result)
    w.log(f"[select-rule] winner on the selection split: {result['winner']}")
    return [out]


def chosen_rule(w: Workdir) -> str:
    """The rule the selection split chose (``rules.json``), or ``single`` before it has run."""
    path = w.path("rules.json")
    return json.loads(path.read_text())["winner"] if path.exists() else "single"


def rule_calibration(
    w: Workdir,
    rule_name: str,
    calnpz: Any,
    *,
    alpha: float,
    beta: float | None = None,
    delta: float | None = None,
    score: str = "probit",
    bins: int | None = None,
    selection: dict[str, np.ndarray] | None = None,
) -> Calibration:
    """Calibrate with a rule whose choices (bin edges, score map) come from the selection split."""
    from dataclasses import replace

    from .rules import calibrate_with_rule, fit_rule, get_rule

    p = w.prof
    rule = get_rule(rule_name)
    if bins is not None:
        rule = replace(rule, bins=bins)
    if rule.map_tau is not None and score != "probit":
        raise ValueError(f"rule {rule.name!r} learns a probit score map; it cannot use score {score!r}")
    beta = p.beta if beta is None else beta
    if selection is None:
        selection = selection_data(w)
    bin_probs = selection["bin_probs"]
    choices = fit_rule(
        rule,
        selection.get("probs", bin_probs),
        selection.get("counts"),
        m=len(calnpz["probs"]),
        n_mc=p.n_cal,
        alpha=alpha,
        beta=beta,
        delta=delta,
        bin_probs=bin_probs,
    )
    return calibrate_with_rule(
        choices,
        calnpz["probs"],
        calnpz["counts"],
        n_mc=p.n_cal,
        sigma=w.config.sigma,
        alpha=alpha,
        beta=beta,
        delta=delta,
        score=score,
    )


def stage_calibrate(
    w: Workdir,
    alpha: float | None = None,
    beta: float | None = None,
    delta: float | None = None,
    score: str = "probit",
    bins: int | None = None,
    rule: str | None = None,
) -> list[Path]:
    """Fresh MC on the held-out calibration inputs, then the split-conformal quantile q̂.

    ``alpha``/``beta`` default to the profile's; ``delta`` asks for a training-conditional (PAC)
    quantile; ``score`` is the transform (probit, logit, identity); ``rule`` the calibration rule
    (default: the one the selection split chose, see ``select-rule``); ``bins`` overrides the rule's
    number of confidence bins. The MC counts are kept, so a re-calibration with other settings
    costs one surrogate pass.
    """
    ds, p = w.data("train"), w.prof
    idx = w.splits()["calibration"]
    images = ds.images[idx]
    # MC is the expensive half: its store is kept (and resumed) across re-calibrations
    _mc_counts(w, CALIBRATION_STORE, idx, p.n_cal, "calibration", "train")
    counts = load_targets(w, "calibration")["counts"]
    probs = surrogate_probs(w.path("surrogate.onnx"), images)
    _save_npz(
        w.path("calibration.npz"),
        index=idx,
        images=images,
        labels=ds.labels[idx],
        counts=counts,
        probs=probs,
        n_mc=p.n_cal,
    )
    rule = rule or chosen_rule(w)
    cal = rule_calibration(
        w,
        rule,
        {"probs": probs, "counts": counts},
        alpha=p.alphas[0] if alpha is None else alpha,
        beta=beta,
        delta=delta,
        score=score,
        bins=bins,
    )
    record = {**cal.to_dict(), "dataset": w.config.dataset, "rule": rule}
    _write_json(w.path("calibration.json"), record)
    return [w.path("calibration.npz"), w.path("calibration.json")]


def stage_certify(w: Workdir) -> list[Path]:
    """Cohen CERTIFY with the base model on the test inputs: the fixed-budget MC baseline."""
    from rrise.progress import progress_bar

    from .mc import certify

    ds, p = w.data("test"), w.prof
    idx = w.splits()["test"]
    info_device = "cpu"
    try:
        import torch

        info_device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - the calibrate stage always has torch
        pass
    images = ds.images[idx]
    backend = _mc_backend(w, images[:1], len(idx) * (p.n0 + p.n), info_device)
    model = _mc_model(w, backend, info_device)
    # Pieces of inputs share forward batches; input i's draws depend only on (seed, i), so the
    # pieces give the same certificates as one call, plus a wall time per piece for the table.
    piece = max(1, min(len(idx), p.batch_size // 10 or 1))
    parts, per_input = [], np.zeros(len(idx))
    with progress_bar(len(idx), "Cohen CERTIFY", "inputs", enabled=w.show_progress) as bar:
        bar.note(f"backend {backend}")
        for lo in range(0, len(idx), piece):
            hi = min(lo + piece, len(idx))
            t0 = time.perf_counter()
            parts.append(
                certify(
                    model,
                    images[lo:hi],
                    n0=p.n0,
                    n=p.n,
                    sigma=w.config.sigma,
                    alpha=p.mc_alpha,
                    batch_size=p.batch_size,
                    num_classes=len(ds.classes),
                    seed=w.seed("certify"),
                    index_offset=lo,
                )
            )
            per_input[lo:hi] = (time.perf_counter() - t0) / (hi - lo)
            bar.advance(hi - lo)
    pred = np.concatenate([r.pred for r in parts])
    radius = np.concatenate([r.radius for r in parts])
    p_lower = np.concatenate([r.p_lower for r in parts])
    counts = np.concatenate([r.counts_estimation for r in parts])
    counts_sel = np.concatenate([r.counts_selection for r in parts])
    seconds = float(per_input.sum())
    labels = ds.labels[idx]
    _save_npz(
        w.path("certify.npz"),
        index=idx,
        labels=labels,
        pred=pred,
        radius=radius,
        p_lower=p_lower,
        counts=counts,
        counts_selection=counts_sel,
        seconds=seconds,
        time=per_input,
    )
    # Per-input table as in Cohen et al.'s logs, plus the counts behind each certificate: `count` is
    # k (votes for the selected class among the n estimation draws), `counts` the full vector.
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\tcount\tn\tp_lower\tcounts\ttime"]
    top = counts_sel.argmax(axis=1)
    for j, (i, lab, pr, r) in enumerate(zip(idx, labels, pred, radius)):
        k = int(counts[j, top[j]])
        vec = ",".join(str(int(c)) for c in counts[j])
        lines.append(
            f"{i}\t{lab}\t{pr}\t{r:.4f}\t{int(pr == lab)}\t{k}\t{p.n}\t{p_lower[j]:.6f}\t{vec}"
            f"\t{per_input[j]:.4f}"
        )
    w.path("certify.tsv").write_text("\n".join(lines) + "\n")
    return [w.path("certify.tsv"), w.path("certify.npz")]


def stage_reference(w: Workdir) -> list[Path]:
    """High-budget reference MC (N_ref draws) on the first test inputs, for violation rates."""
    p = w.prof
    index = w.splits()["test"][: p.n_ref_inputs]
    return [_mc_counts(w, REFERENCE_STORE, index, p.n_ref, "reference", "test")]


def _side_by_side_query_seconds(
    w: Workdir, onnx_path: Path, images: np.ndarray, cal: Calibration, rounds: int = 5, per_round: int = 200
) -> tuple[float, float]:
    """Median wall time of one query of RRISE (a batch-1 surrogate pass plus the certificate) and of
    Cohen MC (n0 + n base-model draws for one input), timed in alternation in this process, so that
    their ratio does not depend on what else the machine was doing at another moment."""
    from rrise.runtime.backends import OnnxRuntimeBackend

    from .mc import certify

    p = w.prof
    backend = OnnxRuntimeBackend(onnx_path)
    base = _mc_model(w, "onnxruntime", "cpu")

    def rrise_query(x: np.ndarray) -> None:
        certify_from_probs(backend.run(x)[0], cal)

    for i in range(100):  # warm-up: thread pools, allocations
        rrise_query(images[i % len(images)][None])
    rrise_s, mc_s = [], []
    for r in range(rounds):
        x = images[r % len(images)][None]
        t0 = time.perf_counter()
        certify(base, x, n0=p.n0, n=p.n, sigma=w.config.sigma, alpha=p.mc_alpha, batch_size=p.batch_size)
        mc_s.append(time.perf_counter() - t0)
        for i in range(per_round):
            xi = images[(r * per_round + i) % len(images)][None]
            t0 = time.perf_counter()
            rrise_query(xi)
            rrise_s.append(time.perf_counter() - t0)
    return float(np.median(rrise_s)), float(np.median(mc_s))


def stage_evaluate(w: Workdir) -> list[Path]:
    """RRISE beside Cohen MC and Accelerated Smoothing on the same test inputs → report/."""
    from .evaluate import (
        DEFAULT_RADII,
        method_metrics,
        pseudo_count_certify,
        reliability_plot,
        violation_stats,
        write_report,
    )
    from .rules import RULES, get_rule

    ds, p = w.data("test"), w.prof
    cohen = np.load(w.path("certify.npz"))
    idx, labels = cohen["index"], cohen["labels"]
    # Reference for violations: the high-budget store of `rrise reference` (N_ref draws on the first
    # test inputs) when it exists, else Cohen's estimation draws on every test input; both independent
    # of everything RRISE and the baseline were trained and calibrated on.
    cohen_counts = cohen["counts"]
    ref_counts, ref_rows = cohen_counts, np.arange(len(idx))
    high_budget = (w.path(REFERENCE_STORE) / "manifest.json").exists()
    if high_budget:
        from .store import load_store

        ref_index, ref_counts, _ = load_store(w.path(REFERENCE_STORE))
        ref_rows = np.searchsorted(idx, ref_index)
        if not np.array_equal(idx[ref_rows], ref_index):
            raise ValueError(f"{w.path(REFERENCE_STORE)} holds inputs that are not among the test inputs")

    def violations(pred: np.ndarray, p_low: np.ndarray) -> dict[str, Any]:
        out = violation_stats(pred[ref_rows], p_low[ref_rows], ref_counts)
        if high_budget:
            out["against Cohen's estimation draws on every test input"] = violation_stats(
                pred, p_low, cohen_counts
            )
        return out

    calnpz = np.load(w.path("calibration.npz"))
    probs = surrogate_probs(w.path("surrogate.onnx"), ds.images[idx])
    methods: dict[str, Any] = {}
    # Every calibration rule at the first α (the choice itself was made on the selection split, see
    # select-rule; these test rows are shown for transparency, not used to choose); at other α the
    # chosen rule and the plain one-quantile rule.
    selection = selection_data(w)
    chosen = chosen_rule(w)
    rules_test: dict[str, Any] = {}
    cals = {}
    for alpha in p.alphas:
        names = [r.name for r in RULES] if alpha == p.alphas[0] else list(dict.fromkeys([chosen, "single"]))
        for name in names:
            try:
                cal = rule_calibration(w, name, calnpz, alpha=alpha, selection=selection)
            except ValueError as exc:
                rules_test[name] = {"rule": get_rule(name).describe(), "error": str(exc)}
                continue
            if name == chosen:
                cals[alpha] = cal
            elif name == "single":
                cals.setdefault(alpha, cal)
            cert = certify_from_probs(probs, cal)
            quantile = [None if not np.isfinite(q) else round(q, 6) for q in cal.bin_quantiles]
            row = method_metrics(
                cert.radius,
                cert.pred,
                labels,
                per_query_s=None,
                quantile=quantile if cal.bin_edges else round(cal.quantile, 6),
                **({"bin_edges": list(cal.bin_edges)} if cal.bin_edges else {}),
                **({"score_map": [list(k) for k in cal.score_map]} if cal.score_map else {}),
                violations=violations(cert.pred, cert.p_lower),
            )
            if alpha == p.alphas[0]:
                rules_test[name] = {"rule": get_rule(name).describe(), **row}
            if name in (chosen, "single"):
                tag = " (chosen on the selection split)" if name == chosen and chosen != "single" else ""
                methods[f"RRISE (probit, {get_rule(name).describe()}, α={alpha:g}){tag}"] = row
    per_query, mc_per_query = _side_by_side_query_seconds(
        w, w.path("surrogate.onnx"), ds.images[idx], cals[p.alphas[0]]
    )
    for m in (*methods.values(), *(r for r in rules_test.values() if "error" not in r)):
        m["per_query_s"] = per_query
    mc_stage_per_query = float(cohen["seconds"]) / len(idx)
    methods[f"Cohen MC (n0={p.n0}, n={p.n}, α={p.mc_alpha:g})"] = method_metrics(
        cohen["radius"], cohen["pred"], labels, per_query_s=mc_per_query, guarantee_kind="per input"
    )
    if w.path("baseline_js.onnx").exists():
        js_probs = surrogate_probs(w.path("baseline_js.onnx"), ds.images[idx])
        pred, radius, p_low = pseudo_count_certify(js_probs, p.n, w.config.sigma, p.mc_alpha)
        methods[f"Accelerated Smoothing (JS, ⌊{p.n}·ŝ⌋, no calibration)"] = method_metrics(
            radius,
            pred,
            labels,
            per_query_s=per_query,
            violations=violations(pred, p_low),
        )
    w.path("report").mkdir(exist_ok=True)
    top = calnpz["probs"].argmax(1)
    mc_freq = calnpz["counts"][np.arange(len(top)), top] / p.n_cal
    reliability_plot(calnpz["probs"][np.arange(len(top)), top], mc_freq, w.path("report/reliability.png"))
    rule_inputs = len(selection.get("counts", ()))  # 0 when the rule came without selection MC
    one_time_evals = (p.n_targets + p.n_selection) * p.target_draws + (p.m + rule_inputs) * p.n_cal
    stage_s = w.stage_seconds()
    # One-time cost at the MC rate measured above (seconds per draw of a single query), so that it
    # compares with the per-query times; stage wall times are kept below as recorded.
    one_time_mc_s = one_time_evals * mc_per_query / (p.n0 + p.n)
    one_time_s = one_time_mc_s + stage_s.get("train-surrogate", 0.0)
    metrics = {
        "dataset": w.config.dataset,
        "sigma": w.config.sigma,
        "profile": p.name,
        "profile_note": p.note,
        "radii": list(DEFAULT_RADII),
        "methods": methods,
        "guarantee": GUARANTEE,
        "rules": {
            "chosen": chosen,
            "selection": _read_json(w.path("rules.json")),
            "test": rules_test,
        },
        "violation_note": (
            f"Violations: certified p̃ above the one-sided 99.9% Clopper–Pearson upper bound of the "
            f"reference frequency of the certified class, from {int(ref_counts[0].sum())} fresh MC draws "
            f"on each of {len(ref_rows)} test inputs (independent of calibration). RRISE's guarantee "
            "allows a rate of α + β."
        ),
        "config": {
            "profile": p.name,
            "dataset": w.config.dataset,
            "sigma": w.config.sigma,
            "seed": w.config.seed,
            "base model": p.base_arch,
            "base training inputs": p.base_train_size,
            "surrogate targets": f"{p.n_targets} inputs × {p.target_draws} draws",
            "calibration": f"m = {p.m}, N_cal = {p.n_cal}, β = {p.beta}, score = probit",
            "test inputs": len(idx),
            "Cohen MC": f"n0 = {p.n0}, n = {p.n}, α = {p.mc_alpha}",
        },
        "cost": {
            "one-time base-model evaluations": one_time_evals,
            "one-time MC seconds at the measured MC rate": round(one_time_mc_s, 1),
            "one-time seconds (that MC + surrogate training)": round(one_time_s, 1),
            "MC per query (s)": round(mc_per_query, 6),
            "RRISE per query (s)": round(per_query, 7),
            "speedup per query": round(mc_per_query / per_query, 1),
            "per-query times": (
                "medians timed in alternation in one process: 5 MC queries (n0 + n draws, batched "
                "onnxruntime) and 1,000 RRISE queries (batch 1, certificate included)"
            ),
            "MC per query over the whole certify stage (s)": round(mc_stage_per_query, 6),
            "break-even queries": int(np.ceil(one_time_s / max(mc_per_query - per_query, 1e-12))),
        },
        "cap": _cap_summary(calnpz, p.n_cal, p.beta, w.config.sigma),
        "stage_seconds": stage_s,
    }
    paths = write_report(w.path("report"), metrics)
    return list(paths.values())


def _cap_summary(calnpz: Any, n_cal: int, beta: float, sigma: float) -> dict[str, Any]:
    """How much the MC budget N_cal limits the radii: the share of calibration inputs whose every
    draw voted for the surrogate's class (their p̲ is at the cap), and the radius the cap allows."""
    from rrise.certificate import p_cap
    from rrise.stats import norm_ppf

    counts, probs = calnpz["counts"], calnpz["probs"]
    top = probs.argmax(axis=1)
    at_cap = float(np.mean(counts[np.arange(len(top)), top] == n_cal))
    cap = p_cap(beta, n_cal)
    return {
        "calibration inputs with every draw on the surrogate's class": round(at_cap, 4),
        "p_cap = β^(1/N_cal)": round(cap, 8),
        "largest radius σ·Φ⁻¹(p_cap) (at q̂ = 0)": round(sigma * float(norm_ppf(cap)), 4),
    }


def stage_bundle(w: Workdir) -> list[Path]:
    """Bundle the surrogate, the base model and the calibration: what the runtime loads."""
    from rrise.export.bundler import build_bundle
    from rrise.export.onnx_export import onnx_parity

    from .models import load_model

    ds = w.data("train")
    cal_record = json.loads(w.path("calibration.json").read_text())
    dataset = cal_record.pop("dataset")
    cal_record.pop("rule", None)
    cal = Calibration(**cal_record)
    model, _ = load_model(w.path("surrogate.pt"))
    calnpz = np.load(w.path("calibration.npz"))
    parity = onnx_parity(model, w.path("surrogate.onnx"), calnpz["images"][:256])
    c, h, wd = ds.shape
    build_bundle(
        w.path("bundle"),
        surrogate_onnx=w.path("surrogate.onnx"),
        base_onnx=w.path("base.onnx"),
        calibration=cal,
        calibration_npz=w.path("calibration.npz"),
        labels=ds.classes,
        preprocess={
            "color": "gray" if c == 1 else "rgb",
            "resize": [h, wd],
            "interpolation": "area",
            "layout": "NCHW",
        },
        dataset=dataset,
        input_shape=ds.shape,
        parity_max_abs_diff=parity,
        overwrite=True,
    )
    return [w.path("bundle")]


STAGES: dict[str, tuple[Callable[[Workdir], list[Path]], list[str]]] = {
    "train-base": (stage_train_base, ["base.pt", "base.onnx"]),
    "targets": (stage_targets, [f"{name}/manifest.json" for name in TARGET_STORES.values()]),
    "train-surrogate": (stage_train_surrogate, ["surrogate.pt", "surrogate.onnx"]),
    "train-baseline": (stage_train_baseline, ["baseline_js.pt", "baseline_js.onnx"]),
    "select-rule": (stage_select_rule, ["rules.json"]),
    "calibrate": (stage_calibrate, ["calibration.npz", "calibration.json"]),
    "certify": (stage_certify, ["certify.tsv", "certify.npz"]),
    "evaluate": (
        stage_evaluate,
        ["report/metrics.json", "report/report.md", "report/certified_accuracy.png"],
    ),
    "bundle": (stage_bundle, ["bundle/manifest.json"]),
}


# Not part of the demo (it costs n_ref_inputs × N_ref base-model evaluations); `evaluate` uses it
# when it is there.
OPTIONAL_STAGES: dict[str, tuple[Callable[[Workdir], list[Path]], list[str]]] = {
    "reference": (stage_reference, [f"{REFERENCE_STORE}/manifest.json"]),
}


def run_stage(w: Workdir, name: str, force: bool = False, **options: Any) -> list[Path]:
    """Run one stage unless its outputs exist (``force`` or stage ``options`` rerun it).

    Records the stage's wall time in ``run.json``.
    """
    fn, outputs = STAGES[name] if name in STAGES else OPTIONAL_STAGES[name]
    if not force and not options and all(w.path(o).exists() for o in outputs):
        w.log(f"[{name}] outputs exist in {w.root}, skipping (--force reruns)")
        return [w.path(o) for o in outputs]
    w.log(f"[{name}] {fn.__doc__.splitlines()[0]}")
    t0 = time.perf_counter()
    out = fn(w, **options)
    seconds = time.perf_counter() - t0
    w.record_seconds(name, seconds)
    w.log(f"[{name}] done in {seconds:.1f} s")
    return out


# --- runtime part of the demo -------------------------------------------------------------
def write_demo_video(path: Path, images: np.ndarray, scale: int = 4, fps: int = 10) -> Path:
    """Write test images as a video (nearest-neighbour ×scale, MJPG), like a small camera stream."""
    import cv2

    n, c, h, wd = images.shape
    size = (wd * scale, h * scale)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for img in images:
        u8 = np.clip(np.rint(img.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        u8 = cv2.resize(u8, size, interpolation=cv2.INTER_NEAREST)
        frame = cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR) if c == 1 else cv2.cvtColor(u8, cv2.COLOR_RGB2BGR)
        writer.write(frame)
    writer.release()
    return path


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_runtime_demo(w: Workdir) -> dict[str, Any]:
    """Stream a video of test images through the runtime, publish on ZeroMQ, read it elsewhere."""
    from rrise.runtime import run_stream

    ds, p = w.data("test"), w.prof
    idx = w.splits()["test"][: p.video_frames]
    video = write_demo_video(w.path("demo_video.avi"), ds.images[idx])
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    received_path = w.path("received.jsonl")
    with open(received_path, "w") as out:
        sub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rrise",
                "subscribe",
                endpoint,
                "--count",
                str(len(idx)),
                "--timeout",
                "20",
            ],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            summary = run_stream(
                w.path("bundle"),
                str(video),
                publish=endpoint,
                wait_subscribers=1,
                wait_timeout_s=20.0,
                backend="onnxruntime",
            )
            _, err = sub.communicate(timeout=60)
        finally:
            if sub.poll() is None:
                sub.kill()
    records = [json.loads(line) for line in received_path.read_text().splitlines() if line.strip()]
    if sub.returncode != 0 and not records:
        raise RuntimeError(f"the subscriber failed: {err.strip()}")
    correct = sum(1 for r, i in zip(records, idx) if r["pred"] == int(ds.labels[i]))
    return {
        "video": str(video),
        "endpoint": endpoint,
        "summary": summary,
        "records": records,
        "received": len(records),
        "sent": summary.get("frames"),
        "correct": correct,
    }


def run_demo(w: Workdir, force: bool = False) -> dict[str, Any]:
    """Every stage in order, then the runtime on a video; returns the metrics and received records."""
    for name in STAGES:
        run_stage(w, name, force=force)
    t0 = time.perf_counter()
    stream = stage_runtime_demo(w)
    w.record_seconds("runtime", time.perf_counter() - t0)
    metrics = json.loads(w.path("report/metrics.json").read_text())
    metrics["stage_seconds"] = w.stage_seconds()
    return {"metrics": metrics, "stream": stream}
