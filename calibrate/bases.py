"""A work folder's base model, from its :class:`~rrise.calibrate.specs.ModelSpec`, and the surrogate
that starts from it.

:func:`base_of` resolves the spec: a built-in network trained on the folder's ``base`` split
(:class:`TrainedBase`) or the user's classifier, imported as it is (:class:`UserBase`). Both make
``base.pt``/``base.onnx`` (the ``train-base`` stage), give the surrogate's starting network and its
epochs, and save and load the trained surrogate; the stages call them without asking which it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rrise.export.onnx_export import export_onnx
from rrise.fileio import atomic_write_json

from . import train
from .model_files import load_model, load_surrogate, save_model, save_surrogate
from .models import ARCHS, build_model
from .specs import NetworkSpec, UserModelSpec
from .surrogates import build_surrogate, surrogate_spec
from .user_model import UserModel, UserModelError, load_user_model
from .workdir import Workdir

__all__ = ["FRESH_MAX_EPOCHS", "FRESH_MIN_STEPS", "TrainedBase", "UserBase", "base_of", "network_config"]

# A surrogate of the user's base that does not start from the base's weights gets at least this many
# optimizer steps (batches of 128): the profiles' epoch counts are sized for fine-tuning a copy.
FRESH_MIN_STEPS = 300
FRESH_MAX_EPOCHS = 60


def network_config(w: Workdir) -> dict[str, Any]:
    """The built-in networks' config on this folder: input channels, classes, image size and the
    input normalization (from the base training images), as :func:`~rrise.calibrate.models.build_model`
    and :func:`~rrise.calibrate.model_files.save_model` take them."""
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


@dataclass
class TrainedBase:
    """A built-in network (``spec.arch``) trained with Gaussian noise on the folder's ``base`` split."""

    w: Workdir
    spec: NetworkSpec

    def make(self) -> list[Path]:
        """Train the network; write base.pt and base.onnx."""
        w, p = self.w, self.w.prof
        ds, idx = w.data("train"), w.splits()["base"]
        shape = network_config(w)
        model = build_model(self.spec.arch, seed=w.config.seed, **shape)
        train.train_base(
            model,
            ds.images[idx],
            ds.labels[idx],
            sigma=w.config.sigma,
            epochs=p.base_epochs,
            seed=w.config.seed,
            show_progress=w.show_progress,
        )
        meta = {"labels": ds.classes, "dataset": w.config.dataset, "sigma": w.config.sigma}
        save_model(model, w.path("base.pt"), arch=self.spec.arch, **shape, **meta)
        export_onnx(model, w.path("base.onnx"), ds.shape)
        return [w.path("base.pt"), w.path("base.onnx")]

    def initial_surrogate(self, arch: str) -> tuple[nn.Module, str]:
        """``(model, arch)``: the base model's weights (``arch="base"``) or a fresh seeded network."""
        w = self.w
        if arch == "base":
            return load_model(w.path("base.pt"))[0], self.spec.arch
        if arch in ARCHS:
            return build_model(arch, seed=w.config.seed, **network_config(w)), arch
        raise ValueError(f"unknown surrogate arch {arch!r}; expected base or one of {', '.join(ARCHS)}")

    def surrogate_epochs(self, model: nn.Module, n_targets: int) -> int:
        return self.w.prof.surrogate_epochs

    def starts_from_weights(self, model: nn.Module, arch: str) -> bool:
        """Whether the surrogate :meth:`initial_surrogate` gave is a copy of the trained base."""
        return arch == "base"

    def distil_steps(self, model: nn.Module, arch: str) -> int:
        """The distil-first steps a surrogate of a built-in base gets by default: none (the phase
        was measured on users' models, not on these)."""
        return 0

    def save_surrogate(self, model: nn.Module, path: Path, arch: str, meta: dict[str, Any]) -> None:
        save_model(model, path, arch=arch, **network_config(self.w), **meta)

    def load_surrogate(self, path: Path) -> nn.Module:
        return load_model(path)[0]


@dataclass
class UserBase:
    """The user's classifier (``rrise build --model``): the folder's base as it is, nothing trained."""

    w: Workdir
    spec: UserModelSpec

    def model(self) -> UserModel:
        """The user's model: the one :func:`rrise.calibrate.build` loaded, else reloaded as recorded."""
        w = self.w
        if w.user_model is None:
            if self.spec.source is None:
                raise UserModelError(
                    f"{w.root} was built from an nn.Module passed in Python; this stage needs it again: "
                    f"call rrise.calibrate.build(model=...) with it"
                )
            w.user_model = load_user_model(self.spec.source, **self.spec.load_options())
        return w.user_model

    def make(self) -> list[Path]:
        """Write the model's canonical ONNX (base.onnx) and where it came from (base.pt, a JSON
        record: nothing here is trained)."""
        um, w = self.model(), self.w
        um.save_onnx(w.path("base.onnx"))
        atomic_write_json(w.path("base.pt"), {"format": "rrise-user-base", "model": um.provenance()})
        return [w.path("base.pt"), w.path("base.onnx")]

    def initial_surrogate(self, arch: str) -> tuple[nn.Module, str]:
        """:func:`rrise.calibrate.surrogates.build_surrogate` for the user's base."""
        w = self.w
        ds = w.data("train")
        base = self.model() if arch in ("auto", "base") else None
        model = build_surrogate(base, ds.shape, len(ds.classes), arch=arch, seed=w.config.seed)
        w.log(f"[train-surrogate] surrogate: {surrogate_spec(model)['why']}")
        return model, arch

    def starts_from_weights(self, model: nn.Module, arch: str) -> bool:
        """Whether the surrogate :meth:`initial_surrogate` gave is a copy of the user's model (not a
        fresh network, which ``auto`` falls back to when the model cannot be copied)."""
        return surrogate_spec(model)["arch"] == "base"

    def distil_steps(self, model: nn.Module, arch: str) -> int:
        """The distil-first steps by default: the profile's ``distil_steps`` for a copy of the user's
        model (where the phase was measured to help), none for a fresh network."""
        return self.w.prof.distil_steps if self.starts_from_weights(model, arch) else 0

    def surrogate_epochs(self, model: nn.Module, n_targets: int) -> int:
        """The profile's epochs for a copy of the base; a fresh network gets at least
        ``FRESH_MIN_STEPS`` optimizer steps (at most ``FRESH_MAX_EPOCHS`` epochs)."""
        epochs = self.w.prof.surrogate_epochs
        if surrogate_spec(model)["arch"] == "base":
            return epochs
        fresh = min(FRESH_MAX_EPOCHS, -(-FRESH_MIN_STEPS * 128 // max(n_targets, 1)))
        if fresh > epochs:
            self.w.log(
                f"[train-surrogate] a fresh network on {n_targets} targets: {fresh} epochs "
                f"(at least {FRESH_MIN_STEPS} steps; the profile's {epochs} are for a copy of the base)"
            )
        return max(epochs, fresh)

    def save_surrogate(self, model: nn.Module, path: Path, arch: str, meta: dict[str, Any]) -> None:
        save_surrogate(model, path, **meta)

    def load_surrogate(self, path: Path) -> nn.Module:
        base = self.model() if self.spec.source is None else None
        return load_surrogate(path, base=base, trust_code=True)[0]


def base_of(w: Workdir) -> TrainedBase | UserBase:
    """The folder's base model, as its spec (``w.config.model_spec``) says."""
    spec = w.config.model_spec
    if isinstance(spec, UserModelSpec):
        return UserBase(w, spec)
    if isinstance(spec, NetworkSpec):
        return TrainedBase(w, spec)
    raise TypeError(f"no base model for a {type(spec).__name__}")
