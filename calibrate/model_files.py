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

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rrise.fileio import atomic_path, sha256_file

from .canonical_model import UserModel
from .models import ARCHS, FORMAT, Normalize, _per_channel, build_model
from .surrogates import (
    _SPEC_ATTR,
    EDGE_RESNET,
    SPEC_KEY,
    EdgeResNet,
    ProbsToLogits,
    SurrogateError,
    _deepcopy,
    _import_factory,
    _make_from_factory,
    surrogate_spec,
)
from .user_model import load_user_model

_CONFIG_KEYS = ("arch", "in_channels", "num_classes", "image_size", "mean", "std")

__all__ = ["load_model", "load_surrogate", "rebuild_surrogate", "save_model", "save_surrogate"]


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
        "mean": _per_channel(mean, int(in_channels), "mean").tolist(),
        "std": _per_channel(std, int(in_channels), "std").tolist(),
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
    payload = torch.load(path, map_location="cpu", weights_only=True)
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


def rebuild_surrogate(
    config: dict, meta: dict, base: UserModel | nn.Module | None = None, *, trust_code: bool = False
) -> nn.Module:
    """The untrained network of a saved surrogate, from its metadata's spec (``load_model`` calls
    this for archs other than ``cnn``/``cnn-small``); its weights are loaded by the caller.
    Torch's global RNG is left as it was. Specs that import Python code (a factory, or a copy of a
    factory or ``.pt2`` base rebuilt without ``base``) need ``trust_code=True``."""
    spec = meta.get(SPEC_KEY) if isinstance(meta, dict) else None
    if isinstance(spec, dict) and not trust_code:
        form = (spec.get("base") or {}).get("form") if isinstance(spec.get("base"), dict) else None
        from_model = spec.get("arch") == "base" and base is None and form in ("factory", "pt2")
        if (spec.get("arch") == "factory" or from_model) and spec.get("base_arch") not in ARCHS:
            raise SurrogateError(
                "this model file names Python code to rebuild its network "
                f"({spec.get('factory') or 'a base'}); "
                "a model file never imports code on its own: pass trust_code=True (or the base) when you "
                "made the file yourself"
            )
    with torch.random.fork_rng(devices=[]):
        return _rebuild(config, meta, base)


def _rebuild(config: dict, meta: dict, base) -> nn.Module:
    spec = meta.get(SPEC_KEY)
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(
            f"unknown model arch {config.get('arch')!r} and no surrogate spec to rebuild it from"
        )
    c, h, w = (int(d) for d in spec["input_shape"])
    k = int(spec["num_classes"])
    arch = spec["arch"]
    if arch in ARCHS or spec.get("base_arch") in ARCHS:
        model = build_model(spec.get("base_arch") or arch, c, k, h, spec["mean"], spec["std"])
    elif arch == EDGE_RESNET:
        model = EdgeResNet(c, k, spec["layout"], spec["mean"], spec["std"])
    elif arch == "factory":
        what = f"the surrogate's factory {spec['factory']}"
        obj, _, _ = _import_factory(spec["factory"])
        model = _make_from_factory(obj, spec["call"], (c, h, w), k, int(spec.get("seed", 0)), what)
        if spec.get("normalize"):
            model = nn.Sequential(Normalize(0.0, 1.0, c), model)
    elif arch == "base":
        model = _rebuild_base(spec, base, (c, h, w))
    else:
        raise ValueError(f"unknown surrogate arch {arch!r} in the surrogate spec")
    setattr(model, _SPEC_ATTR, copy.deepcopy(spec))
    return model


def _rebuild_base(spec: dict, base, shape) -> nn.Module:
    record = spec.get("base", {})
    if base is not None:
        template = base.module if isinstance(base, UserModel) else base
        if template is None:
            raise SurrogateError("the base model given has no torch module to rebuild the surrogate from")
    elif record.get("model"):
        if record["form"] == "pt2":
            path = Path(record["model"])
            if not path.is_file():
                raise SurrogateError(f"the surrogate was copied from MODEL {path}, which no longer exists")
            if record.get("sha256") and sha256_file(path) != record["sha256"]:
                raise SurrogateError(
                    f"the surrogate was copied from MODEL {path}, which has changed since (sha256 differs)"
                )
        opts = dict(record.get("options", {}))
        opts["input_size"] = tuple(opts.get("input_size") or shape[1:])
        template = load_user_model(record["model"], **opts).module
    else:
        raise SurrogateError(
            f"the surrogate was copied from an nn.Module passed in Python ({record.get('class')}); load it "
            f"with rrise.calibrate.model_files.load_surrogate(path, base=that_module)"
        )
    model = _deepcopy(template)
    if spec.get("normalize"):
        model = nn.Sequential(Normalize(0.0, 1.0, shape[0]), model)
    if spec.get("probs_to_logits"):
        model = nn.Sequential(model, ProbsToLogits())
    return model


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
