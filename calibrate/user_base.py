"""The user's model as a `rrise build` folder's base model: loaded (or reloaded from run.json) and
imported as ``base.onnx``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rrise.fileio import atomic_write_json

from .user_model import UserModel, UserModelError, load_user_model
from .workdir import Workdir

__all__ = ["import_base", "user_model"]


def _user_model_args(u: dict[str, Any]) -> dict[str, Any]:
    return {k: u["model_options"].get(k) for k in _MODEL_OPTIONS}


_MODEL_OPTIONS = ("weights", "output", "output_kind", "input_size", "channels", "mean", "std")


def user_model(w: Workdir) -> UserModel:
    """The folder's user model: the one loaded by :func:`build`, else reloaded from run.json."""
    if w.user_model is None:
        u = w.config.user
        if u.get("model") is None:
            raise UserModelError(
                f"{w.root} was built from an nn.Module passed in Python; this stage needs it again: "
                f"call rrise.calibrate.build(model=...) with it"
            )
        w.user_model = load_user_model(u["model"], **_user_model_args(u))
    return w.user_model


def import_base(w: Workdir) -> list[Path]:
    """The user's model is the base: write its canonical ONNX (base.onnx) and where it came from
    (base.pt, a JSON record: nothing here is trained)."""
    um = user_model(w)
    um.save_onnx(w.path("base.onnx"))
    atomic_write_json(w.path("base.pt"), {"format": "rrise-user-base", "model": um.provenance()})
    return [w.path("base.pt"), w.path("base.onnx")]
