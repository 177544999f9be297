"""Weights for a factory model (``rrise build --weights``): a ``.pt``/``.pth`` state dict read with
``torch.load(weights_only=True)`` or a ``.safetensors`` file, loaded strictly (never unpickled)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rrise.fileio import sha256_file

from .canonical_model import UserModelError, short_list

# Files --weights takes (and MODEL must not be).
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# State-dict keys under which checkpoints commonly nest the weights.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def weights_source(weights) -> dict:
    if weights is None:
        return {"weights": None}
    return {"weights": str(Path(weights).resolve()), "weights_sha256": sha256_file(weights)}


def load_weights(module: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load ``path`` (a ``.pt``/``.pth`` state dict via ``torch.load(weights_only=True)``, or a
    ``.safetensors`` file) into ``module``, strictly. Checkpoints nesting the state dict under
    ``state_dict``/``model``/… and ``module.`` prefixes (DataParallel) are unwrapped. Returns notes;
    raises :class:`UserModelError` naming the first key that does not fit."""
    path = Path(path)
    what = f"--weights {path}"
    if not path.is_file():
        raise UserModelError(f"{what} does not exist")
    notes: list[str] = []
    state = _read_state(path, what)
    if isinstance(state, dict) and not _is_state_dict(state):
        nested = [
            k for k in _NESTED_STATE_KEYS if isinstance(state.get(k), dict) and _is_state_dict(state[k])
        ]
        if not nested:
            raise UserModelError(
                f"{what} holds a dict that is not a state dict (keys: {short_list(list(state))})"
            )
        notes.append(f"{what}: using the state dict under {nested[0]!r}")
        state = state[nested[0]]
    if not isinstance(state, dict):
        raise UserModelError(f"{what} holds a {type(state).__name__}, not a state dict")
    expected = module.state_dict()
    if (
        state
        and all(k.startswith("module.") for k in state)
        and not any(k.startswith("module.") for k in expected)
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
        notes.append(f"{what}: stripped the 'module.' prefix (a DataParallel checkpoint)")
    _check_fits(state, expected, what)
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - dtype or other mismatch
        raise UserModelError(f"{what} does not fit the module: {exc}") from None
    return notes


def _read_state(path: Path, what: str):
    """The object a weights file holds: ``.safetensors`` read as tensors, anything else with
    ``torch.load(weights_only=True)`` (never the full unpickler)."""
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserModelError(
                f"{what}: reading .safetensors needs the safetensors package (pip install safetensors)"
            ) from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UserModelError(f"{what} is not a readable .safetensors file: {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserModelError(
            f"{what} cannot be read with torch.load(weights_only=True) ({first}); save "
            f"model.state_dict() (not the whole pickled model), or use .safetensors"
        ) from None


def _check_fits(state: dict, expected: dict, what: str) -> None:
    """Raise naming the first key that is missing, extra or of another shape."""
    for key, value in expected.items():
        if key not in state:
            raise UserModelError(f"{what} does not fit the module: key {key!r} is missing from the file")
        got = state[key]
        if tuple(got.shape) != tuple(value.shape):
            raise UserModelError(
                f"{what} does not fit the module: key {key!r} has shape {list(got.shape)} in the file and "
                f"{list(value.shape)} in the module"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserModelError(
            f"{what} does not fit the module: the file has key {extra[0]!r}, which the module lacks"
        )


def _is_state_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
