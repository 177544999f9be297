"""The user's own base classifier, in the forms users have, as one canonical model for the SDK.

Forms (``rrise build --model``; :func:`load_user_model` in Python):

- ``path.onnx``: any model the installed onnxruntime runs with one NCHW float image input. With
  several outputs, ``output`` names the float ``[B, K]`` one (the error without it lists the
  candidates; a single candidate is taken and said so).
- ``path.pt2``: a ``torch.export`` archive (``torch.export.save``); a static batch dimension (the
  default of ``torch.export.export(model, (x,))``) is lifted when the graph runs on other batch
  sizes with the same per-input results, else the model runs in fixed-size batches.
- ``package.module:attribute`` (or ``path/file.py:attribute``): an ``nn.Module``, or a class or
  function called with no arguments that returns one; ``weights`` loads a ``.pt``/``.pth`` state
  dict with ``torch.load(weights_only=True)`` or a ``.safetensors`` file.
- in Python, an ``nn.Module`` (used as is: it is put in eval mode) or a path.

The canonical form (docs/CERTIFICATE.md): float32 NCHW pixels in [0, 1] at the model's resolution
in, one float ``[B, K]`` output (logits or probabilities: the argmax is what Monte Carlo counts),
with any ``mean``/``std`` normalization wrapped inside (``Sub``/``Div`` nodes before an ONNX graph,
a :class:`~rrise.calibrate.models.Normalize` layer before a module), so σ and radii are in
[0, 1]-pixel units. :class:`UserModel` holds it as ONNX bytes (every form; ``None`` only for a torch
model that does not export) and, for torch forms, the wrapped ``nn.Module``.

Every problem with the model or the options raises :class:`UserModelError` (a ``ValueError``) whose
message names the file or option, for the CLI to print without a traceback.

The jobs live in their own modules: :mod:`~rrise.calibrate.canonical_model` (:class:`UserModel`
and the checks), :mod:`~rrise.calibrate.onnx_import`, :mod:`~rrise.calibrate.torch_import`
(modules, factories, ``.pt2``), :mod:`~rrise.calibrate.weights` and
:mod:`~rrise.calibrate.safety_scan`; this module is the entry point and re-exports their public names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from rrise.fileio import sha256_file

from .canonical_model import ModelOptions, UserModel, UserModelError
from .onnx_import import from_onnx
from .specs import CHANNELS, OUTPUT_KINDS
from .torch_import import from_factory, from_module, from_pt2, import_attribute
from .weights import WEIGHT_SUFFIXES, load_weights, weights_source

__all__ = [
    "CHANNELS",
    "OUTPUT_KINDS",
    "UserModel",
    "UserModelError",
    "file_sha256",
    "import_attribute",
    "load_user_model",
    "load_weights",
]

file_sha256 = sha256_file  # the one file hasher (rrise.fileio)
_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")


# --------------------------------------------------------------------------------------------------
# Entry point


def load_user_model(
    model,
    *,
    weights: str | os.PathLike | None = None,
    output: str | None = None,
    output_kind: str | None = None,
    input_size: Sequence[int] | int | None = None,
    channels: str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> UserModel:
    """The user's model as a :class:`UserModel` (see the module docstring for the forms).

    ``output``: which output (an ONNX output name; a key or index of a torch model's tuple/dict
    output). ``output_kind``: ``logits`` or ``probs``; None detects it (rows that are non-negative
    and sum to 1 on probe inputs are probabilities, and the notes say so); a kind that contradicts
    the outputs is refused. ``input_size``: (H, W) where the model does not fix it (torch models,
    ONNX with symbolic sizes); must agree where it does. ``channels``: ``rgb`` (PyTorch's
    convention), ``bgr`` or ``gray``; None: ``gray`` for a 1-channel model, else ``rgb``.
    ``mean``/``std``: the normalization the model expects (a float or one per channel, in [0, 1]
    pixel units), wrapped inside the canonical model. Raises :class:`UserModelError`.
    """
    opts = ModelOptions.make(output, output_kind, input_size, channels, mean, std)
    if isinstance(model, UserModel):
        return model
    if isinstance(model, nn.Module):
        if weights is not None:
            load_weights(model, weights)
        source = {"form": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
        source.update(weights_source(weights))
        return from_module(model.eval(), source, opts, what=f"MODEL {type(model).__name__}")
    if not isinstance(model, (str, os.PathLike)):
        raise UserModelError(
            f"MODEL must be an .onnx or .pt2 path, package.module:attribute or an nn.Module, "
            f"got {type(model)}"
        )
    return _from_path(os.fspath(model), weights, opts)


def _from_path(text: str, weights, opts: ModelOptions) -> UserModel:
    """MODEL given as text: an ``.onnx``/``.pt2`` file or ``package.module:attribute``."""
    path = Path(text)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in WEIGHT_SUFFIXES:
            raise UserModelError(
                f"MODEL {text} is a weights file: pass the module as package.module:attribute and this "
                f"file as --weights"
            )
        if weights is not None and suffix in (".onnx", ".pt2"):
            raise UserModelError(
                f"--weights applies to package.module:attribute models; MODEL {text} carries its own"
            )
        if suffix == ".onnx":
            return from_onnx(path, opts)
        if suffix == ".pt2":
            return from_pt2(path, opts)
        raise UserModelError(
            f"MODEL {text}: unknown model file type {suffix!r}; expected .onnx, .pt2 or "
            f"package.module:attribute"
        )
    if path.is_dir():
        raise UserModelError(f"MODEL {text} is a folder, not a model file")
    match = _FACTORY.match(text)
    if match:
        return from_factory(text, match["module"], match["attr"], weights, opts)
    if suffix in (".onnx", ".pt2", *WEIGHT_SUFFIXES):
        raise UserModelError(f"MODEL {text} does not exist")
    raise UserModelError(f"MODEL {text} is neither a model file (.onnx, .pt2) nor package.module:attribute")
