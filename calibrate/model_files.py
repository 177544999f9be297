"""Model files: one format (``rrise.model/1``, ``{format, config, meta, state_dict}`` written with
``torch.save`` and read with ``torch.load(weights_only=True)``) for base models and surrogates.

:func:`save_model` writes any network with its config (arch, shape, normalization) and JSON-like
metadata; :func:`save_surrogate` adds the spec of a :func:`~rrise.calibrate.surrogates.
build_surrogate` network (key ``surrogate``), so that :func:`load_model` / :func:`load_surrogate`
can rebuild it from code (built-ins, ``edge-resnet``, factories re-imported by their string, copies
of ``cnn``/``cnn-small`` bases, of ``.pt2`` bases and of factory bases re-loaded from the recorded
MODEL). Only a copy of an ``nn.Module`` passed in Python needs that module again:
``load_surrogate(path, base=module)``. A model file never makes the SDK import code on its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rrise.fileio import atomic_path

from .canonical_model import UserModel
from .models import ARCHS, FORMAT, build_model, per_channel
from .surrogates import (
    SPEC_KEY,
    SurrogateError,
    rebuild_surrogate,
    surrogate_spec,
)

_CONFIG_KEYS = ("arch", "in_channels", "num_classes", "image_size", "mean", "std")

__all__ = ["load_model", "load_surrogate", "save_model", "save_surrogate"]


def _json_like(value, where: str):
    """``value`` as str/int/float/bool/None/list/dict (what ``torch.load(weights_only=True)`` reads)."""
    if isinstance(value, np.generic):  # before the builtins: np.float64 is a float subclass
        return _json_like(value.item(), where)
    if value is None:
        return None
    for kind in (bool, int, float, str):  # plain builtins, also for subclasses (IntEnum, ...)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, np.ndarray):
        return _json_like(value.tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_json_like(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"model meta keys must be str, got {k!r} in {where}")
            out[k] = _json_like(v, f"{where}.{k}")
        return out
    raise TypeError(f"model meta {where} must be JSON-like (str/int/float/list/dict), got {type(value)}")


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    **meta,
) -> None:
    """Write ``{format, config, meta, state_dict}`` with torch.save, atomically (temp file + rename).

    ``meta`` must be JSON-like; numpy scalars/arrays, tuples and paths are converted.
    """
    config = {
        "arch": str(arch),
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "mean": per_channel(mean, int(in_channels), "mean").tolist(),
        "std": per_channel(std, int(in_channels), "std").tolist(),
    }
    payload = {
        "format": FORMAT,
        "config": config,
        "meta": _json_like(meta, "meta"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # a file object: the archive's name does not depend on the temp name


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a model written by :func:`save_model` or :func:`save_surrogate`: ``(model on CPU in eval
    mode, config + meta)``; a file whose network needs Python code it names is refused (see
    :func:`load_surrogate`)."""
    return load_surrogate(path)


def save_surrogate(model: nn.Module, path: str | os.PathLike, **meta) -> None:
    """Write ``model`` (made by :func:`build_surrogate`, trained or not) with
    :func:`save_model`, atomically; ``meta`` (JSON-like: labels, sigma,
    history, ...) is stored beside the spec (key ``surrogate``) and ``input_shape``."""
    spec = surrogate_spec(model)
    for key in (SPEC_KEY, "input_shape"):
        if key in meta:
            raise TypeError(f"save_surrogate writes meta[{key!r}] itself")
    c, h, _ = spec["input_shape"]
    config_arch = spec.get("base_arch") or spec["arch"]
    mean = 0.0 if spec.get("mean") is None else spec["mean"]
    std = 1.0 if spec.get("std") is None else spec["std"]
    save_model(
        model,
        path,
        arch=config_arch,
        in_channels=c,
        num_classes=spec["num_classes"],
        image_size=h,
        mean=mean,
        std=std,
        input_shape=spec["input_shape"],
        **{SPEC_KEY: spec},
        **meta,
    )


def load_surrogate(
    path: str | os.PathLike, base: UserModel | nn.Module | None = None, *, trust_code: bool = False
) -> tuple[nn.Module, dict]:
    """``(model on CPU in eval mode, config + meta)`` of a :func:`save_surrogate` (or
    :func:`save_model`) file. ``base``: the base model a ``base``
    surrogate was copied from, needed only when it was an ``nn.Module`` passed in Python (used as
    the template for any ``base`` surrogate when given). A file whose network is built by Python code
    it names (a factory, or a copy of a factory or ``.pt2`` base) is refused unless ``trust_code``:
    a model file never makes the SDK import or run code on its own."""
    payload = _read_model_file(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rrise model file (expected format {FORMAT!r})")
    config, meta = payload["config"], payload.get("meta", {})
    spec = meta.get(SPEC_KEY)
    if spec is None:
        if config["arch"] not in ARCHS:
            raise ValueError(f"{path} records arch {config['arch']!r} but no surrogate spec")
        model = build_model(**{k: config[k] for k in _CONFIG_KEYS}, seed=0)
    else:
        model = rebuild_surrogate(config, meta, base=base, trust_code=trust_code)
    model = model.cpu()
    _load_state(model, payload["state_dict"], str(path))
    return model.eval(), {**meta, **config}


def _read_model_file(path: str | os.PathLike) -> object:
    """The payload of a model file, read with ``torch.load(weights_only=True)``; a file it refuses
    (pickled code or objects, a damaged file) is one ValueError naming it, never unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        kind = (
            "holds objects other than tensors and plain values"
            if "Weights only" in str(exc)
            else (f"is damaged or not a torch file ({type(exc).__name__})")
        )
        raise ValueError(
            f"{path} is not an rrise model file: it {kind}, so it was not loaded (model files are read "
            "without unpickling code)"
        ) from None


def _load_state(model: nn.Module, state: dict, what: str) -> None:
    """Strict ``load_state_dict`` whose error names the first key that does not fit."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise SurrogateError(f"{what} does not fit the rebuilt surrogate: key {key!r} is missing")
        if tuple(state[key].shape) != tuple(value.shape):
            raise SurrogateError(
                f"{what} does not fit the rebuilt surrogate: key {key!r} has shape {list(state[key].shape)} "
                f"in the file and {list(value.shape)} in the network"
            )
    extra = [key for key in state if key not in expected]
    if extra:
        raise SurrogateError(
            f"{what} does not fit the rebuilt surrogate: the file has extra key {extra[0]!r}"
        )
    model.load_state_dict(state, strict=True)
