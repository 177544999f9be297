"""Training: the base classifier under Gaussian noise, and the surrogate on Monte Carlo counts.

Both loops are deterministic given ``seed`` (shuffling and noise come from generators seeded here;
on CPU with a fixed thread count the result is bit-reproducible). Inputs are float32 NCHW pixels in
[0, 1]; models normalize internally.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rrise.fileio import atomic_path
from rrise.progress import progress_bar

from .augmentations import AUGMENTATIONS

__all__ = [
    "AUGMENTATIONS",
    "augment_batch",
    "hard_example_weights",
    "mean_kl",
    "predict_probs",
    "train_base",
    "train_surrogate",
    "train_surrogate_fresh",
    "Training",
]


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _as_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _optimizer(model: nn.Module, lr: float, steps: int):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return opt, sched


@dataclass(frozen=True, kw_only=True)
class Training:
    """How a network is trained (:func:`train_base`, :func:`train_surrogate`,
    :func:`train_surrogate_fresh` take one, or its fields as keywords).

    ``batch_size``, ``lr`` (Adam, cosine decay), ``seed`` (shuffling, noise, augmentation) and
    ``show_progress`` apply to every loop; the surrogate's loops also take ``augment`` (see
    :func:`augment_batch`), a held-out ``val_images``/``val_counts`` pair (the best weights on it are
    kept), a ``checkpoint`` file to resume from, for fresh targets ``eval_every`` (steps between
    validations), and ``freeze_norm``: batch-norm layers keep their running statistics and normalize
    with them while the rest trains (for a surrogate that starts as a copy of a trained base model,
    whose statistics describe the noisy inputs it was trained on; see :func:`set_training_mode`).
    """

    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    show_progress: bool = True
    augment: str = "none"
    val_images: np.ndarray | None = None
    val_counts: np.ndarray | None = None
    checkpoint: str | os.PathLike | None = None
    eval_every: int = 50
    freeze_norm: bool = False

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if (self.val_images is None) != (self.val_counts is None):
            raise ValueError("give both val_images and val_counts, or neither")


_BASE_SETTINGS = ("batch_size", "lr", "seed", "show_progress")


def set_training_mode(model: nn.Module, freeze_norm: bool) -> nn.Module:
    """``model.train()``, except that with ``freeze_norm`` every batch-norm layer stays in eval mode:
    it normalizes with its running statistics and does not update them (its scale and shift still
    train). Fine-tuning a copy of a trained network on a few clean images per step would otherwise
    replace statistics the base model learned under noise with those of small clean batches."""
    model.train()
    if freeze_norm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def _training(training: Training | None, given: dict, allowed: tuple[str, ...] | None = None) -> Training:
    """``training`` (or the defaults) with the keywords ``given`` over it; a TypeError names a
    keyword that is not a setting (or not one this loop uses)."""
    if allowed is not None:
        extra = sorted(set(given) - set(allowed))
        if extra:
            raise TypeError(f"unexpected keyword argument {extra[0]!r} (takes {', '.join(allowed)})")
    base = training if training is not None else Training()
    return replace(base, **given) if given else base


def _check_training_args(n: int, epochs: int, batch_size: int, lr: float) -> None:
    if n == 0:
        raise ValueError("no training examples")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")


def train_base(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    sigma: float,
    epochs: int,
    training: Training | None = None,
    **settings,
) -> nn.Module:
    """Train ``model`` with cross-entropy on ``x + ε``, ``ε ~ N(0, σ²I)`` (not clipped), as Cohen et al.

    Adam with a cosine learning-rate schedule over all steps; deterministic given ``seed``. Trains in
    place on the model's device and returns the model in eval mode. ``training`` (or its fields
    ``batch_size``, ``lr``, ``seed``, ``show_progress`` as keywords): see :class:`Training`.
    """
    t = _training(training, settings, _BASE_SETTINGS)
    batch_size, lr, seed = t.batch_size, t.lr, t.seed
    device = _device(model)
    x_all = _as_images(images, device)
    y_all = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    if len(y_all) != len(x_all):
        raise ValueError(f"{len(x_all)} images but {len(y_all)} labels")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    n = len(x_all)
    _check_training_args(n, epochs, batch_size, lr)
    steps_per_epoch = math.ceil(n / batch_size)
    opt, sched = _optimizer(model, lr, epochs * steps_per_epoch)
    order_rng = np.random.default_rng(seed)
    noise_gen = torch.Generator(device=device).manual_seed(int(seed))
    model.train()
    with progress_bar(epochs * steps_per_epoch, "train base", "batch", enabled=t.show_progress) as bar:
        for epoch in range(epochs):
            order = torch.as_tensor(order_rng.permutation(n), device=device)
            loss_sum = torch.zeros((), device=device)  # accumulated on the device: no sync per step
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                x, y = x_all[idx], y_all[idx]
                noise = torch.randn(x.shape, generator=noise_gen, device=device)
                logits = model(x + sigma * noise)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == y).sum()
                bar.advance(1)
            bar.note(
                f"epoch {epoch + 1}/{epochs} loss {float(loss_sum) / n:.3f} noisy acc {int(correct) / n:.3f}"
            )
    return model.eval()


def _targets(counts: np.ndarray, n_images: int) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 2 or len(c) != n_images:
        raise ValueError(f"counts must be [N, K] with N = {n_images}, got shape {c.shape}")
    if np.any(c < 0):
        raise ValueError("counts must be non-negative")
    totals = c.sum(axis=1, keepdims=True)
    if np.any(totals == 0):
        raise ValueError(f"counts row {int(np.flatnonzero(totals[:, 0] == 0)[0])} sums to zero")
    return (c / totals).astype(np.float32)


def _kl_terms(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example KL(target || softmax(logits)) = Σ t log t − Σ t log s (0·log 0 = 0)."""
    log_s = F.log_softmax(logits.float(), dim=1)
    return (torch.xlogy(target, target) - target * log_s).sum(dim=1)


def soft_label_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``−mean Σ_c t_c log softmax(h)_c``: the RRISE surrogate loss against counts/N."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def jensen_shannon(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Jensen–Shannon divergence between counts/N and softmax(h) (nats)."""
    s = F.softmax(logits, dim=1)
    mix = 0.5 * (s + target)
    log_mix = torch.log(mix.clamp_min(1e-12))
    kl_t = (torch.xlogy(target, target) - target * log_mix).sum(dim=1)
    kl_s = (torch.xlogy(s, s) - s * log_mix).sum(dim=1)
    return (0.5 * (kl_t + kl_s)).mean()


SURROGATE_LOSSES = {"ce": soft_label_cross_entropy, "js": jensen_shannon}


CHECKPOINT_FORMAT = "rrise.surrogate-checkpoint/1"


def augment_batch(x: torch.Tensor, how: str, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random label-free augmentation of a batch [B, C, H, W]: ``shift`` translates each image by up
    to ``max_shift`` pixels (zero fill), ``flip`` mirrors half of them left-right.

    With a fixed target store the MC targets belong to the un-augmented image, so this trades
    exactness of the targets for regularisation; with fresh targets
    (:func:`train_surrogate_fresh`) the draws are made on the augmented image itself, so the targets
    stay exact and the augmentation only widens the set of inputs the surrogate learns from.
    """
    if how not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {how!r}")
    if how == "none":
        return x
    b, _, h, w = x.shape
    if "flip" in how:
        flip = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if "shift" in how:
        k = max_shift
        padded = F.pad(x, (k, k, k, k))
        dy = torch.randint(0, 2 * k + 1, (b,), generator=gen, device=x.device)
        dx = torch.randint(0, 2 * k + 1, (b,), generator=gen, device=x.device)
        rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    return x


def train_surrogate(
    model: nn.Module,
    images: np.ndarray,
    counts: np.ndarray,
    *,
    epochs: int,
    loss: str = "ce",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    training: Training | None = None,
    **settings,
) -> tuple[nn.Module, dict]:
    """Fit the surrogate to the smoothed class distribution on CLEAN inputs.

    Loss: ``L = −mean_x Σ_c (k_c/N)·log softmax(h(x))_c`` (soft-label cross-entropy on counts/N).
    With a validation split, the mean KL(counts/N ‖ softmax) on it is measured after every epoch and
    the weights of the best epoch are restored (selection on held-out data, never on calibration
    data). Returns ``(model in eval mode, {"train_kl": [...], "val_kl": [...], "best_epoch": i})``;
    ``train_kl`` is the running mean KL over each epoch's batches, ``best_epoch`` a 0-based epoch index
    (the last epoch when no validation split is given).

    ``loss="js"`` trains with the Jensen–Shannon divergence to counts/N instead: the "Accelerated
    Smoothing" baseline (arXiv 2402.07498), kept for comparison; RRISE uses ``"ce"``.
    ``training`` (or its fields as keywords, :class:`Training`): ``augment``, the validation split,
    and ``checkpoint``, a file written (atomically) after every epoch; when it exists and was made
    with the same settings, training resumes from it and ends with the same weights as an
    uninterrupted run. ``on_epoch_end(epoch, history)`` is called after each epoch's checkpoint.
    """
    if loss not in SURROGATE_LOSSES:
        raise ValueError(f"loss must be one of {sorted(SURROGATE_LOSSES)}, got {loss!r}")
    t = _training(training, settings)
    device = _device(model)
    x_all = _as_images(images, device)
    t_all = torch.from_numpy(_targets(counts, len(x_all))).to(device)
    n = len(x_all)
    _check_training_args(n, epochs, t.batch_size, t.lr)
    steps_per_epoch = math.ceil(n / t.batch_size)
    fit = _SurrogateFit.start(model, t.lr, epochs, steps_per_epoch, t.seed)
    run = {"epochs": epochs, "batch_size": t.batch_size, "lr": t.lr, "seed": t.seed}
    frozen = {"freeze_norm": True} if t.freeze_norm else {}  # earlier checkpoints still resume
    signature = _signature(model, t_all, **run, loss=loss, augment=t.augment, **frozen)
    first_epoch = 0 if t.checkpoint is None else fit.restore(t.checkpoint, signature, device)
    with progress_bar(epochs * steps_per_epoch, "train surrogate", "batch", enabled=t.show_progress) as bar:
        bar.advance(first_epoch * steps_per_epoch)
        for epoch in range(first_epoch, epochs):
            fit.run_epoch(epoch, epochs, (x_all, t_all, SURROGATE_LOSSES[loss]), t, bar)
            if t.checkpoint is not None:
                _save_checkpoint(t.checkpoint, fit.state(signature, epoch))
            if on_epoch_end is not None:
                on_epoch_end(epoch, fit.history)
    if fit.best_state is not None:
        model.load_state_dict(fit.best_state)
    return model.eval(), fit.history


@dataclass
class _SurrogateFit:
    """Everything a surrogate fit carries from epoch to epoch (and a checkpoint holds)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    order_rng: np.random.Generator
    aug_gen: torch.Generator
    history: dict
    best_state: dict | None = None
    best_val: float = math.inf

    @classmethod
    def start(
        cls, model: nn.Module, lr: float, epochs: int, steps_per_epoch: int, seed: int
    ) -> _SurrogateFit:
        opt, sched = _optimizer(model, lr, epochs * steps_per_epoch)
        aug_gen = torch.Generator(device=_device(model)).manual_seed(int(seed) + 1)
        history = {"train_kl": [], "val_kl": [], "best_epoch": epochs - 1}
        return cls(model, opt, sched, np.random.default_rng(seed), aug_gen, history)

    def epoch(self, x_all, t_all, loss_fn, t: Training, bar) -> float:
        """One pass over the shuffled inputs; returns the running mean KL over its batches."""
        set_training_mode(self.model, t.freeze_norm)
        augment, batch_size = t.augment, t.batch_size
        n, device = len(x_all), x_all.device
        order = torch.as_tensor(self.order_rng.permutation(n), device=device)
        kl_sum = torch.zeros((), device=device)  # accumulated on the device: no sync per step
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            target = t_all[idx]
            logits = self.model(augment_batch(x_all[idx], augment, self.aug_gen))
            batch_loss = loss_fn(logits, target)
            self.opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            self.opt.step()
            self.sched.step()
            kl_sum += _kl_terms(logits.detach(), target).sum()
            bar.advance(1)
        return float(kl_sum) / n

    def run_epoch(self, epoch: int, epochs: int, data: tuple, t: Training, bar) -> None:
        """One epoch on ``data`` = ``(images, targets, loss_fn)``, then its validation; notes both."""
        x_all, t_all, loss_fn = data
        train_kl = self.epoch(x_all, t_all, loss_fn, t, bar)
        self.history["train_kl"].append(train_kl)
        note = f"epoch {epoch + 1}/{epochs} train KL {train_kl:.4f}"
        if t.val_images is not None:
            note += f" val KL {self.validate(epoch, t.val_images, t.val_counts):.4f}"
        bar.note(note)

    def validate(self, epoch: int, val_images: np.ndarray, val_counts: np.ndarray) -> float:
        """Held-out KL after ``epoch``; keeps the weights of the best epoch so far."""
        val = mean_kl(self.model, val_images, val_counts)
        self.history["val_kl"].append(val)
        if val < self.best_val:
            self.best_val, self.history["best_epoch"] = val, epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
        return val

    def state(self, signature: dict, epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "signature": signature,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "order_rng": self.order_rng.bit_generator.state,
            "aug_rng": self.aug_gen.get_state(),
            "history": self.history,
            "best_state": self.best_state,
            "best_val": self.best_val,
        }

    def restore(self, checkpoint: str | os.PathLike, signature: dict, device: torch.device) -> int:
        """Continue from ``checkpoint`` when it exists (tensors and plain data only: never unpickles
        code); returns the first epoch still to run. Refuses one made with other settings."""
        if not Path(checkpoint).exists():
            return 0
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("signature") != signature:
            raise ValueError(
                f"checkpoint {checkpoint} was made with other settings or targets; delete it to start over"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.order_rng.bit_generator.state = state["order_rng"]
        self.aug_gen.set_state(state["aug_rng"])
        self.history, self.best_state, self.best_val = (
            state["history"],
            state["best_state"],
            state["best_val"],
        )
        return state["epoch"] + 1


def _signature(model: nn.Module, targets: torch.Tensor, **settings) -> dict:
    """What a checkpoint must have been made with to be resumed: the settings, the targets and the
    model's parameter shapes (another architecture is refused, not half-loaded)."""
    return {
        "n": len(targets),
        **settings,
        "targets": _digest(targets),
        "parameters": [[k, list(v.shape)] for k, v in model.state_dict().items()],
    }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()


def _save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


FRESH_CHECKPOINT_FORMAT = "rrise.fresh-surrogate-checkpoint/1"


def train_surrogate_fresh(
    model: nn.Module,
    pool,
    label: Callable[[np.ndarray, int], np.ndarray],
    *,
    steps: int,
    draws: int,
    weights: np.ndarray | None = None,
    training: Training | None = None,
    **settings,
) -> tuple[nn.Module, dict]:
    """Fit the surrogate on fresh Monte Carlo targets: each step draws ``batch_size`` images from
    ``pool`` (any ``[N, C, H, W]`` indexable by an index array), augments them (``augment``, see
    :func:`augment_batch`; seeded by the step) and labels the images as augmented with ``label(x,
    offset)``: ``draws`` fresh noisy draws per image through the base model, input ``j`` seeded by
    ``offset + j`` (the caller binds the model, σ and the seed), so every step sees new draws and a
    run is reproducible and resumable. The targets are exact for the image the surrogate sees, so
    augmentation costs no label noise: it only adds inputs. ``weights`` (one per pool image, summing
    to 1; uniform when None) draw each batch in proportion to them: the targets stay exact, only
    where the surrogate spends its capacity moves (see :func:`hard_example_weights`).

    Loss: soft-label cross-entropy against counts/draws. It is linear in the target, so a few-draw
    target is an unbiased estimate of the full-MC loss's gradient: the surrogate fits the smoothed
    distribution p(x) itself over as many inputs as there are steps. Adam with cosine decay; every
    ``eval_every`` steps (and at the end) the held-out KL on ``val_images`` is measured, the best
    weights are kept (and a ``checkpoint`` written, from which a rerun resumes to the same weights).
    Returns ``(model in eval mode, {"val_kl", "eval_steps", "best_step", "base_evaluations"})``.
    """
    t = _training(training, settings)
    if t.val_images is None:
        raise ValueError("fresh-target training needs val_images and val_counts (its model selection)")
    _check_fresh_args(len(pool), steps, draws, t.batch_size, t.lr, t.eval_every)
    _check_weights(weights, len(pool), t.batch_size)
    device = _device(model)
    opt, sched = _optimizer(model, t.lr, steps)
    signature = _fresh_signature(model, t, steps, draws, len(pool), weights)
    state = _restore_fresh(t.checkpoint, signature, model, opt, sched, device)
    with progress_bar(steps, "train surrogate (fresh targets)", "step", enabled=t.show_progress) as bar:
        bar.advance(state["step"])
        for step in range(state["step"], steps):
            x, target = _fresh_batch(pool, label, step, t.batch_size, draws, t.seed, t.augment, weights)
            set_training_mode(model, t.freeze_norm)
            loss = soft_label_cross_entropy(model(_as_images(x, device)), target.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.advance(1)
            if (step + 1) % t.eval_every == 0 or step + 1 == steps:
                _fresh_validate(state, model, step, t.val_images, t.val_counts)
                bar.note(f"step {step + 1}/{steps} val KL {state['history']['val_kl'][-1]:.4f}")
                if t.checkpoint is not None:
                    _save_checkpoint(t.checkpoint, _fresh_state(signature, state, step, model, opt, sched))
    if state["best"] is not None:
        model.load_state_dict(state["best"])
    history = dict(state["history"], base_evaluations=steps * t.batch_size * draws)
    return model.eval(), history


def _fresh_signature(model: nn.Module, t: Training, steps: int, draws: int, pool: int, weights) -> dict:
    """What a fresh-target checkpoint must have been made with to be resumed."""
    return _signature(
        model,
        torch.from_numpy(np.ascontiguousarray(t.val_counts)),
        steps=steps,
        draws=draws,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        pool=pool,
        **({} if t.augment == "none" else {"augment": t.augment}),  # earlier checkpoints still resume
        **({} if weights is None else {"weights": _digest(torch.from_numpy(np.asarray(weights)))}),
        **({"freeze_norm": True} if t.freeze_norm else {}),
    )


def _check_fresh_args(pool: int, steps: int, draws: int, batch_size: int, lr: float, eval_every: int) -> None:
    if steps < 1 or draws < 1 or batch_size < 1 or not lr > 0 or eval_every < 1:
        raise ValueError(
            f"need steps, draws, batch_size, eval_every >= 1 and lr > 0; got {steps}, {draws}, "
            f"{batch_size}, {eval_every}, {lr}"
        )
    if pool < batch_size:
        raise ValueError(f"the fresh-target pool has {pool} images, fewer than one batch ({batch_size})")


def _check_weights(weights, pool: int, batch_size: int) -> None:
    if weights is None:
        return
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (pool,) or not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must be {pool} non-negative numbers summing to 1, one per pool image")
    if np.count_nonzero(w) < batch_size:
        raise ValueError(
            f"weights give {np.count_nonzero(w)} images a chance, fewer than one batch ({batch_size})"
        )


def hard_example_weights(counts: np.ndarray, hard_fraction: float) -> np.ndarray:
    """Sampling weights over a pool from a few Monte Carlo draws per image (``counts`` [N, K]): a
    ``hard_fraction`` of the mass in proportion to ``1 − top-class frequency`` (how far the smoothed
    classifier is from certain on the image), the rest uniform, so no image is left out. With no
    uncertain image at all, uniform."""
    if not 0.0 <= hard_fraction < 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1), got {hard_fraction}")
    k = np.asarray(counts, dtype=np.float64)
    hard = 1.0 - k.max(axis=1) / k.sum(axis=1)
    uniform = np.full(len(k), 1.0 / len(k))
    if hard.sum() <= 0.0:
        return uniform
    return (1.0 - hard_fraction) * uniform + hard_fraction * hard / hard.sum()


def _fresh_batch(
    pool, label, step: int, batch_size: int, draws: int, seed: int, augment: str = "none", weights=None
):
    """Step ``step``'s images (a seeded draw from ``pool``, in proportion to ``weights``, augmented
    with a seeded generator: the same on every rerun) and their targets counts/draws from ``draws``
    fresh draws each on the augmented images, seeded by the step's own input offsets."""
    rng = np.random.default_rng([int(seed), step])
    idx = np.sort(rng.choice(len(pool), size=batch_size, replace=False, p=weights))
    x = np.asarray(pool[idx], dtype=np.float32)
    if augment != "none":
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        x = augment_batch(torch.from_numpy(x), augment, gen).numpy()
    counts = np.asarray(label(x, step * batch_size))
    if counts.shape[0] != len(x) or np.any(counts.sum(axis=1) != draws):
        raise ValueError(f"label() must return [{len(x)}, K] counts of {draws} draws each")
    return x, torch.from_numpy(counts.astype(np.float32) / draws)


def _fresh_validate(state: dict, model: nn.Module, step: int, val_images, val_counts) -> None:
    """Held-out KL after ``step``; keeps the best weights so far."""
    val = mean_kl(model, val_images, val_counts)
    state["history"]["val_kl"].append(val)
    state["history"]["eval_steps"].append(step + 1)
    if val < state["best_val"]:
        state["best_val"], state["history"]["best_step"] = val, step + 1
        state["best"] = copy.deepcopy(model.state_dict())


def _fresh_state(signature: dict, state: dict, step: int, model, opt, sched) -> dict:
    return {
        "format": FRESH_CHECKPOINT_FORMAT,
        "signature": signature,
        "step": step + 1,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "history": state["history"],
        "best": state["best"],
        "best_val": state["best_val"],
    }


def _restore_fresh(checkpoint, signature: dict, model, opt, sched, device) -> dict:
    """The loop's state from ``checkpoint`` (tensors and plain data only), or a fresh start when
    there is none; refuses a checkpoint made with other settings."""
    if checkpoint is None or not Path(checkpoint).exists():
        history = {"val_kl": [], "eval_steps": [], "best_step": -1}
        return {"step": 0, "history": history, "best": None, "best_val": math.inf}
    saved = torch.load(checkpoint, map_location=device, weights_only=True)
    if saved.get("format") != FRESH_CHECKPOINT_FORMAT or saved.get("signature") != signature:
        raise ValueError(f"checkpoint {checkpoint} was made with other settings; delete it to start over")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return {k: saved[k] for k in ("step", "history", "best", "best_val")}


def _batched_logits(model: nn.Module, images: np.ndarray, batch_size: int):
    device = _device(model)
    x_all = _as_images(images, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(x_all), batch_size):
                yield start, model(x_all[start : start + batch_size])
    finally:
        model.train(was_training)


def mean_kl(model: nn.Module, images: np.ndarray, counts: np.ndarray, batch_size: int = 512) -> float:
    """Mean over inputs of KL(counts/N ‖ softmax(model(x))), in nats, in eval mode."""
    target = _targets(counts, len(images))
    if len(target) == 0:
        raise ValueError("no images to evaluate")
    device = _device(model)
    total = 0.0
    for start, logits in _batched_logits(model, images, batch_size):
        t = torch.from_numpy(target[start : start + len(logits)]).to(device)
        total += float(_kl_terms(logits, t).sum())
    return total / len(target)


def predict_probs(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``softmax(model(x))`` as float64 ``[N, K]``, computed without gradients in eval mode."""
    out = [
        F.softmax(logits.double(), dim=1).cpu().numpy()
        for _, logits in _batched_logits(model, images, batch_size)
    ]
    if not out:
        raise ValueError("no images to predict")
    return np.concatenate(out)
