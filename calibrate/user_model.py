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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rrise.fileio import atomic_write_bytes, sha256_file

from .specs import CHANNELS, OUTPUT_KINDS

__all__ = [
    "CHANNELS",
    "OUTPUT_KINDS",
    "UserModel",
    "UserModelError",
    "file_sha256",
    "load_user_model",
    "load_weights",
]

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w.]*|.+\.py):(?P<attr>[A-Za-z_][\w.]*)$")
_PROBS_ATOL = 1e-3  # rows within this of summing to 1 (and non-negative) are probabilities
_PROBE_BATCH = 3
# State-dict keys under which checkpoints commonly nest the weights.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class UserModelError(ValueError):
    """The user's model or its options cannot be used; the message names the file or option."""


file_sha256 = sha256_file  # the one file hasher (rrise.fileio)


# --------------------------------------------------------------------------------------------------
# The canonical model


@dataclass(eq=False)
class UserModel:
    """A base classifier in the SDK's canonical form (see the module docstring).

    ``onnx``: the canonical ONNX model as bytes (None for a torch model that does not export);
    ``module``: the canonical ``nn.Module`` for torch forms (normalization inside, eval mode), else
    None; ``input_shape``: ``(C, H, W)``; ``channels``: the channel order the model expects (``rgb``,
    ``bgr`` or ``gray``: the manifest's ``preprocess.color``); ``num_classes``: K;
    ``output_kind``: ``logits`` or ``probs``; ``output_name``: the chosen output in the source
    model; ``mean``/``std``: the normalization wrapped inside (None when none); ``fixed_batch``: the
    canonical ONNX's static batch size, or None when any batch size runs; ``source``: provenance
    (form, path, sha256 of the source file(s), weights and their sha256, factory string);
    ``notes``: what was detected or decided, in words, for the CLI to print.
    """

    onnx: bytes | None
    module: nn.Module | None
    input_shape: tuple[int, int, int]
    channels: str
    num_classes: int
    output_kind: str
    output_name: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    fixed_batch: int | None
    source: dict[str, Any]
    notes: tuple[str, ...] = ()
    _session: Any = field(default=None, init=False, repr=False)

    @property
    def form(self) -> str:
        return self.source["form"]

    @property
    def name(self) -> str:
        """How the user named the model (path or factory string), for messages."""
        return str(self.source.get("path") or self.source.get("factory") or self.source.get("class"))

    @property
    def onnx_sha256(self) -> str | None:
        """sha256 of the canonical ONNX bytes (what :meth:`save_onnx` writes), None without ONNX."""
        return None if self.onnx is None else hashlib.sha256(self.onnx).hexdigest()

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record of where the model came from and how it was made canonical."""
        return {
            **self.source,
            "channels": self.channels,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "output": self.output_name,
            "output_kind": self.output_kind,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "fixed_batch": self.fixed_batch,
            "onnx_sha256": self.onnx_sha256,
        }

    def save_onnx(self, path: str | os.PathLike) -> Path:
        """Write the canonical ONNX atomically (the bundle's ``base_model``); raises without one."""
        if self.onnx is None:
            raise UserModelError(f"MODEL {self.name} has no ONNX form (its export failed; see the notes)")
        return atomic_write_bytes(path, self.onnx)

    def session(self):
        """The onnxruntime session on the canonical ONNX (made once; fastest providers, all cores)."""
        if self.onnx is None:
            raise UserModelError(f"MODEL {self.name} has no ONNX form (its export failed; see the notes)")
        if self._session is None:
            from .mc import _open_session

            self._session = _open_session(self.onnx)
        return self._session

    def check_classes(
        self, num_classes: int, classes: Sequence[str] | None = None, data: str = "DATA"
    ) -> None:
        """Raise unless the data's class count equals the model's K (``data`` names the data)."""
        if int(num_classes) != self.num_classes:
            names = "" if classes is None else f" ({_short_list(list(classes))})"
            raise UserModelError(
                f"MODEL {self.name} outputs {self.num_classes} classes but {data} has {num_classes}"
                f"{names}: the model's output k must mean the data's class k"
            )

    def forward(self, x, batch_size: int = 256) -> np.ndarray:
        """``[B, K]`` float32 outputs for ``x`` ``[B, C, H, W]`` float32 in [0, 1] (canonical ONNX when
        there is one, else the module)."""
        x = np.asarray(x, dtype=np.float32)
        outs = []
        for start in range(0, len(x), max(1, int(batch_size))):
            part = np.ascontiguousarray(x[start : start + max(1, int(batch_size))])
            if self.onnx is not None:
                outs.append(_run_fixed(self.session(), part, self.fixed_batch))
            else:
                with torch.inference_mode():
                    outs.append(self.module(torch.from_numpy(part)).float().cpu().numpy())
        if not outs:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(outs).astype(np.float32, copy=False)

    def predict(self, x, batch_size: int = 256, offset: int = 0) -> np.ndarray:
        """Clean predictions (int64 ``[B]``) of ``x``; raises naming the first input index (plus
        ``offset``) whose output has a NaN or inf."""
        out = self.forward(x, batch_size)
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if bad.size:
            raise UserModelError(
                f"MODEL {self.name} outputs NaN or inf on input index {offset + int(bad[0])} "
                f"({bad.size} of {len(out)} inputs)"
            )
        return out.argmax(axis=1).astype(np.int64)

    def prepare_for_mc(self, backend: str = "auto", *, sample=None, batch_size: int = 1000, draws=None):
        """This model bound to a Monte Carlo backend (:func:`rrise.calibrate.mc.sample_counts` calls this).

        ``auto``: the canonical ONNX on onnxruntime (so the counts are those of the very model a
        bundle ships as its ``base_model`` for audits), except a module on a GPU (torch) or a torch
        model without ONNX (torch). ``torch`` needs a torch form; ``onnxruntime`` needs the ONNX."""
        from .mc import BACKENDS, PreparedModel, _module_device

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        on_gpu = self.module is not None and _module_device(self.module).type != "cpu"
        if backend == "torch" or (backend == "auto" and (self.onnx is None or on_gpu)):
            if self.module is None:
                raise ValueError(f"backend='torch' needs a torch model; MODEL {self.name} is ONNX")
            return PreparedModel("torch", self.module)
        return PreparedModel("onnxruntime", self.session())

    def summary(self) -> str:
        c, h, w = self.input_shape
        norm = (
            "" if self.mean is None else f", normalization mean={list(self.mean)} std={list(self.std)} inside"
        )
        return (
            f"{self.form} model {self.name}: {c}×{h}×{w} {self.channels} in [0, 1] → {self.num_classes} "
            f"{self.output_kind} (output {self.output_name!r}){norm}"
        )


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
    opts = _Options.make(output, output_kind, input_size, channels, mean, std)
    if isinstance(model, UserModel):
        return model
    if isinstance(model, nn.Module):
        if weights is not None:
            load_weights(model, weights)
        source = {"form": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
        source.update(_weights_source(weights))
        return _from_module(model.eval(), source, opts, what=f"MODEL {type(model).__name__}")
    if not isinstance(model, (str, os.PathLike)):
        raise UserModelError(
            f"MODEL must be an .onnx or .pt2 path, package.module:attribute or an nn.Module, "
            f"got {type(model)}"
        )
    return _from_path(os.fspath(model), weights, opts)


def _from_path(text: str, weights, opts: _Options) -> UserModel:
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
            return _from_onnx(path, opts)
        if suffix == ".pt2":
            return _from_pt2(path, opts)
        raise UserModelError(
            f"MODEL {text}: unknown model file type {suffix!r}; expected .onnx, .pt2 or "
            f"package.module:attribute"
        )
    if path.is_dir():
        raise UserModelError(f"MODEL {text} is a folder, not a model file")
    match = _FACTORY.match(text)
    if match:
        return _from_factory(text, match["module"], match["attr"], weights, opts)
    if suffix in (".onnx", ".pt2", *WEIGHT_SUFFIXES):
        raise UserModelError(f"MODEL {text} does not exist")
    raise UserModelError(f"MODEL {text} is neither a model file (.onnx, .pt2) nor package.module:attribute")


@dataclass(frozen=True)
class _Options:
    output: str | None
    output_kind: str | None
    input_size: tuple[int, int] | None
    channels: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @staticmethod
    def make(output, output_kind, input_size, channels, mean, std) -> _Options:
        if output_kind is not None and output_kind not in OUTPUT_KINDS:
            raise UserModelError(
                f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}"
            )
        if channels is not None and channels not in CHANNELS:
            raise UserModelError(f"--channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
        size = None
        if input_size is not None:
            size = (
                (input_size, input_size) if isinstance(input_size, (int, np.integer)) else tuple(input_size)
            )
            if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
                raise UserModelError(f"--input-size must be two positive integers H W, got {input_size!r}")
            size = (int(size[0]), int(size[1]))
        if (mean is None) != (std is None):
            raise UserModelError("--mean and --std go together: pass both or neither")
        m = s = None
        if mean is not None:
            m = tuple(float(v) for v in np.atleast_1d(np.asarray(mean, dtype=np.float64)))
            s = tuple(float(v) for v in np.atleast_1d(np.asarray(std, dtype=np.float64)))
            if not all(np.isfinite(m)) or not all(np.isfinite(s)) or min(s) <= 0:
                raise UserModelError(f"--mean must be finite and --std positive, got {list(m)} and {list(s)}")
            if max(m) > 2.0 or max(s) > 2.0:
                raise UserModelError(
                    f"--mean {list(m)} / --std {list(s)} look like 0–255 pixel units; give them for "
                    f"pixels in [0, 1] (e.g. 0.485 0.456 0.406 and 0.229 0.224 0.225)"
                )
        return _Options(output, output_kind, size, channels, m, s)

    def per_channel(self, c: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        if self.mean is None:
            return None
        for name, v in (("--mean", self.mean), ("--std", self.std)):
            if len(v) not in (1, c):
                raise UserModelError(f"{name} needs 1 or {c} values for a {c}-channel model, got {len(v)}")
        return tuple(np.broadcast_to(self.mean, (c,)).tolist()), tuple(
            np.broadcast_to(self.std, (c,)).tolist()
        )


def _resolve_shape(
    what: str, c: int | None, h: int | None, w: int | None, opts: _Options, static_from: str
) -> tuple[int, int, int, str]:
    """(C, H, W, channels) from what the model fixes and the options; raises on a conflict."""
    if opts.channels is not None:
        want = CHANNELS[opts.channels]
        if c is not None and c != want:
            raise UserModelError(
                f"--channels {opts.channels} gives {want} channel(s) but {what} takes {c} ({static_from})"
            )
        channels = opts.channels
    elif c is None or c == 3:
        channels = "rgb"
    elif c == 1:
        channels = "gray"
    else:
        raise UserModelError(f"{what} takes {c}-channel images; the SDK feeds 1 (gray) or 3 (rgb/bgr)")
    c = CHANNELS[channels]
    if opts.input_size is not None:
        ih, iw = opts.input_size
        if (h is not None and h != ih) or (w is not None and w != iw):
            raise UserModelError(
                f"--input-size {ih} {iw} disagrees with {what}, which takes {h}×{w} ({static_from})"
            )
        h, w = ih, iw
    if h is None or w is None:
        raise UserModelError(f"{what} does not fix its input height and width: pass --input-size H W")
    return c, int(h), int(w), channels


def _probe_inputs(shape: tuple[int, int, int], batch: int = _PROBE_BATCH) -> np.ndarray:
    """Deterministic probe images in [0, 1]: all zeros, all ones, then uniform noise."""
    x = np.random.default_rng(0).random((max(batch, 1), *shape), dtype=np.float32)
    x[0] = 0.0
    if batch > 1:
        x[1] = 1.0
    return x[:batch]


def _output_kind(out: np.ndarray, requested: str | None, what: str) -> tuple[str, list[str]]:
    """``logits`` or ``probs`` from probe outputs and the request; notes; raises on a contradiction."""
    sums = out.astype(np.float64).sum(axis=1)
    probs = bool(np.all(out >= -1e-6) and np.all(np.abs(sums - 1.0) <= _PROBS_ATOL))
    if requested == "logits" and probs:
        raise UserModelError(
            f"--output-kind logits, but {what} rows are non-negative and sum to 1 on every probe input: "
            f"they are probabilities; pass --output-kind probs (or leave it out)"
        )
    if requested == "probs" and not probs:
        raise UserModelError(
            f"--output-kind probs, but {what} rows do not sum to 1 (sums {sums.min():.3g} to "
            f"{sums.max():.3g} on probe inputs): pass --output-kind logits (or leave it out)"
        )
    if requested is None and probs:
        return "probs", [f"{what} rows sum to 1: treated as probabilities (--output-kind probs)"]
    return requested or "logits", []


def _check_finite_probe(out: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        names = {0: "the all-zero image", 1: "the all-one image"}
        i = int(bad[0])
        raise UserModelError(
            f"{what} outputs NaN or inf on probe input index {i} ({names.get(i, 'a uniform-noise image')})"
        )


def _short_list(items: list, limit: int = 8) -> str:
    text = ", ".join(str(v) for v in items[:limit])
    return text + (f", … ({len(items)} in all)" if len(items) > limit else "")


_GPU_HINTS = ("cuda", "gpu", "tensorrt", "could not find an implementation")


def _gpu_message(what: str, exc: BaseException) -> str | None:
    """A clear message when ``exc`` says the model needs a GPU this machine lacks, else None."""
    text = str(exc)
    if not any(h in text.lower() for h in _GPU_HINTS):
        return None
    here = "CPU only"
    try:
        import onnxruntime as ort

        here = ", ".join(ort.get_available_providers())
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and "could not find an implementation" not in text.lower():
        return None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return (
        f"{what} needs a GPU execution provider or device that is absent here (available: {here}): "
        f"{first}. Export it for the CPU (float32, standard operators), or run on a machine with the GPU"
    )


# --------------------------------------------------------------------------------------------------
# ONNX


def _read_onnx(path: Path, what: str):
    """The ONNX proto with its external weights loaded, and its provenance (sha256 of every file)."""
    import onnx
    from onnx import external_data_helper

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise several types
        raise UserModelError(f"{what} is not a readable ONNX model: {exc}") from None
    source: dict[str, Any] = {"form": "onnx", "path": str(path.resolve()), "sha256": file_sha256(path)}
    external = sorted(
        {
            e.value
            for t in external_data_helper._get_all_tensors(proto)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data
            if e.key == "location"
        }
    )
    if not external:
        return proto, source
    source["external_data"] = {}
    for name in external:
        f = path.parent / name
        if not f.is_file():
            raise UserModelError(f"{what} keeps weights in {name}, which is not beside it")
        source["external_data"][name] = file_sha256(f)
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:  # noqa: BLE001
        raise UserModelError(f"{what}: cannot read its external weights: {exc}") from None
    return proto, source


def _onnx_image_input(proto, what: str, opts: _Options):
    """The graph's one float NCHW input: (input, numpy dtype, static batch or None, (C, H, W), channels)."""
    import onnx

    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise UserModelError(f"{what} has {len(inputs)} inputs ({names}); the SDK needs one image input")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    float_types = {
        onnx.TensorProto.FLOAT: np.float32,
        onnx.TensorProto.FLOAT16: np.float16,
        onnx.TensorProto.DOUBLE: np.float64,
    }
    if not inp.type.HasField("tensor_type") or elem not in float_types:
        kind = onnx.TensorProto.DataType.Name(elem) if inp.type.HasField("tensor_type") else "not a tensor"
        raise UserModelError(
            f"{what}: input {inp.name!r} is {kind}; the SDK feeds float pixels in [0, 1] (noise cannot be "
            f"added to integer pixels): export the model with a float input"
        )
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inp.type.tensor_type.shape.dim
    ]
    if len(dims) != 4:
        raise UserModelError(f"{what}: input {inp.name!r} has {len(dims)} dimensions; the SDK needs NCHW (4)")
    batch, c, h, w = dims
    if c not in (None, 1, 3) and w in (1, 3):
        raise UserModelError(
            f"{what}: input {inp.name!r} has shape {dims}, which looks like NHWC; export the model "
            f"with NCHW input"
        )
    c, h, w, channels = _resolve_shape(what, c, h, w, opts, "its ONNX input shape")
    return inp, float_types[elem], batch, (c, h, w), channels


def _from_onnx(path: Path, opts: _Options) -> UserModel:
    what = f"MODEL {path}"
    proto, source = _read_onnx(path, what)
    inp, in_dtype, batch, (c, h, w), channels = _onnx_image_input(proto, what, opts)
    norm = opts.per_channel(c)
    try:
        original = proto.SerializeToString()
    except ValueError as exc:
        raise UserModelError(
            f"{what} is larger than 2 GB once its external weights are inside: {exc}"
        ) from None
    # probe the original model: which outputs exist, which are float [B, K]
    session = _session_or_error(original, what)
    nb = batch or _PROBE_BATCH
    x = _probe_inputs((c, h, w), nb)
    x_in = x
    if norm is not None:
        mean, std = (np.asarray(v, np.float32).reshape(1, c, 1, 1) for v in norm)
        x_in = (x - mean) / std
    try:
        outs = session.run(None, {inp.name: x_in.astype(in_dtype)})
    except Exception as exc:  # noqa: BLE001
        gpu = _gpu_message(what, exc)
        raise UserModelError(gpu or f"{what} fails on a [{nb}, {c}, {h}, {w}] input: {exc}") from None
    names = [o.name for o in session.get_outputs()]
    chosen, notes = _choose_output(names, outs, nb, opts.output, what)
    ref = np.asarray(outs[names.index(chosen)])
    k = int(ref.shape[1])
    _check_finite_probe(ref.astype(np.float64), what)
    kind, more = _output_kind(ref.astype(np.float64), opts.output_kind, f"{what} output {chosen!r}")
    notes += more
    canonical, fixed_batch, more = _canonical_onnx(
        proto, inp.name, in_dtype, chosen, (c, h, w), batch, norm, ref, x, what
    )
    notes += more
    return UserModel(
        onnx=canonical,
        module=None,
        input_shape=(c, h, w),
        channels=channels,
        num_classes=k,
        output_kind=kind,
        output_name=chosen,
        mean=None if norm is None else norm[0],
        std=None if norm is None else norm[1],
        fixed_batch=fixed_batch,
        source=source,
        notes=tuple(notes),
    )


def _session_or_error(model: bytes, what: str):
    from .mc import _open_session

    try:
        return _open_session(model)
    except Exception as exc:  # noqa: BLE001 - open_session raises ValueError/RuntimeError with ORT's text
        gpu = _gpu_message(what, exc)
        text = str(exc).replace("onnxruntime cannot load serialized model: ", "")
        raise UserModelError(gpu or f"{what}: onnxruntime cannot run it: {text}") from None


def _choose_output(names: list[str], outs: list, batch: int, requested: str | None, what: str):
    """The float [B, K] output to use (by name), and notes; raises listing the candidates."""

    def describe(v) -> str:
        if isinstance(v, np.ndarray):
            return f"{v.dtype} {list(v.shape)}"
        if isinstance(v, list):
            return "a sequence of maps (sklearn's ZipMap: re-export with zipmap=False)"
        return type(v).__name__

    def ok(v) -> bool:
        return (
            isinstance(v, np.ndarray)
            and v.dtype.kind == "f"
            and v.ndim == 2
            and v.shape[0] == batch
            and v.shape[1] >= 2
        )

    listing = "; ".join(f"{n}: {describe(v)}" for n, v in zip(names, outs))
    if requested is not None:
        if requested not in names:
            raise UserModelError(f"--output {requested!r}: {what} has no such output (it has {listing})")
        v = outs[names.index(requested)]
        if not ok(v):
            raise UserModelError(
                f"--output {requested!r} of {what} is {describe(v)}; it must be float [B, K] with K >= 2"
            )
        return requested, []
    candidates = [n for n, v in zip(names, outs) if ok(v)]
    if len(names) == 1:
        if not candidates:
            raise UserModelError(
                f"{what} output {names[0]!r} is {describe(outs[0])} on a batch of {batch}; it must be float "
                f"[B, K] (one score per class, K >= 2)"
            )
        return names[0], []
    if len(candidates) == 1:
        return candidates[0], [
            f"{what} has {len(names)} outputs; using {candidates[0]!r}, the only float [B, K] one"
        ]
    if not candidates:
        raise UserModelError(f"none of the outputs of {what} is float [B, K] ({listing})")
    raise UserModelError(
        f"{what} has several float [B, K] outputs ({listing}): pick one with --output NAME "
        f"(candidates: {', '.join(candidates)})"
    )


def _rename_value(graph, old: str, new: str) -> None:
    """Rename value ``old`` to ``new`` in every node input and output, in subgraphs too."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else []:
                _rename_value(sub, old, new)
            for sub in attr.graphs:
                _rename_value(sub, old, new)


def _used_names(graph) -> set[str]:
    """Every value name a graph's nodes read, subgraphs included (outer-scope references)."""
    used = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subs:
                used |= _used_names(sub)
    return used


def _prune(graph, keep: str) -> None:
    """Keep only output ``keep`` and the nodes and initializers it depends on."""
    outputs = [o for o in graph.output if o.name == keep]
    del graph.output[:]
    graph.output.extend(outputs)
    needed, kept = {keep}, []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(n for n in node.input if n)
            for attr in node.attribute:
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for sub in subs:
                    needed |= _used_names(sub)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _canonical_onnx(proto, input_name, in_dtype, output, chw, batch, norm, ref, x, what):
    """The canonical ONNX bytes, its fixed batch (None if dynamic) and notes.

    Canonical: one float32 NCHW input in [0, 1] (normalization and input casts inside), one float32
    [B, K] output, a dynamic batch axis where the model allows one, outputs equal to the original's.
    """
    model = _rewrite_io(proto, input_name, in_dtype, output, chw[0], norm)
    probe = _probe_inputs(chw, _PROBE_BATCH)
    forms = [None] if batch is None else [None, batch]  # a static batch: try to free it first
    last_error = None
    for fixed in forms:
        _set_io(model.graph, input_name, output, chw, "batch" if fixed is None else fixed, int(ref.shape[1]))
        try:
            data = model.SerializeToString()
        except ValueError as exc:
            raise UserModelError(f"{what} is larger than 2 GB: {exc}") from None
        try:
            _check_canonical(_session_or_error(data, what), probe, ref, fixed)
        except UserModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - this batch form does not work; try the next
            last_error = exc
            continue
        notes: list[str] = []
        if batch is not None and fixed is None:
            notes.append(
                f"{what} declares batch size {batch} but runs on any batch size: the batch axis is freed"
            )
        elif fixed is not None:
            notes.append(
                f"{what} only runs batches of {fixed}: Monte Carlo runs it {fixed} draw(s) per forward pass "
                f"(export it with a dynamic batch axis to run much faster)"
            )
        return data, fixed, notes
    raise UserModelError(
        f"{what}: the canonical model (normalization/casts added) does not run: {last_error}"
    )


def _check_canonical(session, probe: np.ndarray, ref: np.ndarray, fixed: int | None) -> None:
    """Raise ValueError unless the canonical model gives the original's outputs (``ref``) on ``probe``,
    and, with a dynamic batch, the same per-input outputs in a batch as alone."""
    k = min(len(ref), _PROBE_BATCH)  # ref's first rows are the same images as probe's
    got = _run_fixed(session, probe, fixed)
    if not np.allclose(got[:k], np.asarray(ref[:k], np.float32), rtol=1e-4, atol=1e-5):
        diff = float(np.max(np.abs(got[:k] - ref[:k])))
        raise ValueError(f"it differs from the original model (max |Δ| {diff:.3g})")
    if fixed is None:
        alone = np.concatenate([_run_fixed(session, probe[i : i + 1], None) for i in range(len(probe))])
        if not np.allclose(got, alone, rtol=1e-4, atol=1e-5):
            raise ValueError("a batch gives other per-input outputs than single inputs")


def _rewrite_io(proto, input_name: str, in_dtype, output: str, c: int, norm):
    """A copy of ``proto`` pruned to ``output``, with normalization and casts to and from float32 added."""
    from onnx import TensorProto, helper

    model = copy.deepcopy(proto)
    graph = model.graph
    _prune(graph, output)
    del graph.value_info[:]  # shapes inferred for the old input/batch could contradict the new ones
    fresh = _fresh_names(graph)
    pre = _input_nodes(graph, input_name, in_dtype, c, norm, fresh)
    post = []
    if graph.output[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raw_out = fresh(f"{output}__rrise_raw")
        _rename_value(graph, output, raw_out)
        post.append(
            helper.make_node("Cast", [raw_out], [output], to=TensorProto.FLOAT, name=fresh("rrise_cast_out"))
        )
    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)
    if model.ir_version < 4:  # initializers had to be graph inputs then
        for init in graph.initializer:
            if init.name not in {i.name for i in graph.input}:
                graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


def _fresh_names(graph):
    """A function giving names no node, value or initializer of ``graph`` uses yet."""
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {
        i.name for i in graph.initializer
    }

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    return fresh


def _input_nodes(graph, input_name: str, in_dtype, c: int, norm, fresh) -> list:
    """Nodes that take float32 [0, 1] pixels at ``input_name`` to what the model expects (normalized,
    cast); the model's own input is renamed. Empty when it already takes float32 [0, 1] pixels."""
    from onnx import TensorProto, helper, numpy_helper

    if norm is None and in_dtype == np.float32:
        return []
    raw = fresh(f"{input_name}__rrise_raw")
    _rename_value(graph, input_name, raw)
    pre, cur = [], input_name
    if norm is not None:
        mean_name, std_name = fresh("rrise_mean"), fresh("rrise_std")
        for name, vals in ((mean_name, norm[0]), (std_name, norm[1])):
            graph.initializer.append(
                numpy_helper.from_array(np.asarray(vals, np.float32).reshape(1, c, 1, 1), name)
            )
        centred = fresh("rrise_centred")
        scaled = raw if in_dtype == np.float32 else fresh("rrise_scaled")
        pre.append(helper.make_node("Sub", [cur, mean_name], [centred], name=fresh("rrise_sub_mean")))
        pre.append(helper.make_node("Div", [centred, std_name], [scaled], name=fresh("rrise_div_std")))
        cur = scaled
    if in_dtype != np.float32:
        to = TensorProto.FLOAT16 if in_dtype == np.float16 else TensorProto.DOUBLE
        pre.append(helper.make_node("Cast", [cur], [raw], to=to, name=fresh("rrise_cast_input")))
    return pre


def _set_io(graph, input_name: str, output: str, chw, batch_dim, k_probe: int) -> None:
    """Declare the graph's input as float32 [batch_dim, C, H, W] and its output as float32 [batch_dim, K]."""
    from onnx import TensorProto, helper

    c, h, w = chw
    for vi in [i for i in graph.input if i.name == input_name]:
        graph.input.remove(vi)
    graph.input.insert(0, helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch_dim, c, h, w]))
    dims = graph.output[0].type.tensor_type.shape.dim
    k = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else k_probe
    graph.output.pop()
    graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch_dim, k]))


def _run_fixed(session, x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    """Run a one-input session on ``x``; with a static batch size, in padded chunks of that size."""
    name = session.get_inputs()[0].name
    if fixed_batch is None or len(x) == fixed_batch:
        return np.asarray(session.run(None, {name: x})[0], dtype=np.float32)
    outs = []
    for start in range(0, len(x), fixed_batch):
        part = x[start : start + fixed_batch]
        pad = fixed_batch - len(part)
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
        outs.append(np.asarray(session.run(None, {name: part})[0], np.float32)[: fixed_batch - pad])
    return np.concatenate(outs)


# --------------------------------------------------------------------------------------------------
# torch: modules, factories, torch.export archives


class _Select(nn.Module):
    """Picks one element (an index or a key) of a model's tuple/dict/object output."""

    def __init__(self, model: nn.Module, key: int | str):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x):
        out = self.model(x)
        if isinstance(self.key, int):
            return out[self.key]
        return out[self.key] if isinstance(out, dict) else getattr(out, self.key)


class _Exported(nn.Module):
    """A ``torch.export`` program's module as a plain module: ``train()``/``eval()`` only set the flag
    (an exported graph is frozen in the mode it was exported in and refuses ``train()``)."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph = graph_module

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self


class _FixedBatch(nn.Module):
    """Runs a module that only takes batches of ``size`` on any batch, in padded chunks."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model = model
        self.size = int(size)

    def forward(self, x):
        outs = []
        for start in range(0, x.shape[0], self.size):
            part = x[start : start + self.size]
            pad = self.size - part.shape[0]
            if pad:
                part = torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])
            outs.append(self.model(part)[: self.size - pad])
        return torch.cat(outs)

    def train(self, mode: bool = True):
        self.training = bool(mode)
        self.model.train(mode)
        return self


def _first_conv_channels(module: nn.Module) -> int | None:
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            return int(sub.in_channels)
    return None


def _torch_outputs(out, batch: int) -> list[tuple[str, Any]]:
    """``(name, value)`` of a module's output: a tensor → [("0"...)] style listing for tuples/dicts."""
    if isinstance(out, torch.Tensor):
        return [("", out)]
    if isinstance(out, dict):
        return [(str(k), v) for k, v in out.items()]
    if isinstance(out, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(out)]
    if hasattr(out, "logits"):
        return [("logits", out.logits)]
    return [("", out)]


def _from_module(
    module: nn.Module,
    source: dict,
    opts: _Options,
    *,
    what: str,
    static: tuple[int | None, int | None, int | None, int | None] | None = None,
    export_twin=None,
) -> UserModel:
    """The canonical form of a torch module (``static``: (batch, C, H, W) an export fixes;
    ``export_twin``: a function ``(C, H, W) → module`` computing the same as ``module``, tried for the
    ONNX export when ``module`` itself does not export)."""
    b0, c0, h0, w0 = static or (None, _first_conv_channels(module), None, None)
    conv_note = "its first convolution" if static is None else "its exported input shape"
    c, h, w, channels = _resolve_shape(what, c0, h0, w0, opts, conv_note)
    norm = opts.per_channel(c)
    net = module if norm is None else _with_normalize(module, norm, c)
    net.eval()
    nb = b0 or _PROBE_BATCH
    x = _probe_inputs((c, h, w), nb)
    raw = _probe_forward(net, x, what, channels)
    listing = _torch_outputs(raw, nb)
    names = [n or "output" for n, _ in listing]
    values = [v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v for _, v in listing]
    requested = opts.output
    if requested is not None and len(listing) == 1 and listing[0][0] == "":
        if requested not in ("output", "0"):
            raise UserModelError(f"--output {requested!r}: {what} returns a single tensor")
        requested = "output"
    chosen, notes = _choose_output(names, values, nb, requested, what)
    key = listing[names.index(chosen)][0]
    select = None if key == "" else (int(key) if isinstance(raw, (tuple, list)) else key)
    if select is not None:
        net = _Select(net, select).eval()
    ref = np.asarray(values[names.index(chosen)], dtype=np.float32)
    _check_finite_probe(ref.astype(np.float64), what)
    kind, more = _output_kind(ref.astype(np.float64), opts.output_kind, f"{what} output")
    notes += more
    data, more = _export_module(net, (c, h, w), b0, ref, x, what, kind)
    if data is None and export_twin is not None:
        twin = _twin_of(export_twin, (c, h, w), norm, select)
        if twin is not None:
            data, twin_notes = _export_module(twin, (c, h, w), b0, ref, x, what, kind)
            if data is not None:
                more = []
    notes += more
    return UserModel(
        onnx=data,
        module=net,
        input_shape=(c, h, w),
        channels=channels,
        num_classes=int(ref.shape[1]),
        output_kind=kind,
        output_name=chosen if key != "" else "output",
        mean=None if norm is None else norm[0],
        std=None if norm is None else norm[1],
        fixed_batch=b0 if data is not None else None,
        source=source,
        notes=tuple(notes),
    )


def _probe_forward(net: nn.Module, x: np.ndarray, what: str, channels: str):
    """The module's raw output on the probe batch ``x``; a failure is a :class:`UserModelError`."""
    try:
        with torch.inference_mode():
            return net(torch.from_numpy(x).to(_device_of(net)))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward
        gpu = _gpu_message(what, exc)
        shape = ", ".join(map(str, x.shape))
        raise UserModelError(
            gpu or f"{what} fails on a [{shape}] float32 input ({channels}): {type(exc).__name__}: {exc}"
        ) from None


def _twin_of(export_twin, chw, norm, select) -> nn.Module | None:
    """The export twin for ``chw`` wrapped like the module (normalization, output selection), or None."""
    try:
        twin = export_twin(chw)
    except Exception:  # noqa: BLE001 - no twin either: keep the first failure's note
        return None
    if twin is None:
        return None
    twin = twin if norm is None else _with_normalize(twin, norm, chw[0])
    return (twin if select is None else _Select(twin, select)).eval()


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def _with_normalize(module: nn.Module, norm, c: int) -> nn.Module:
    from .models import Normalize

    layer = Normalize(list(norm[0]), list(norm[1]), c).to(_device_of(module))
    return nn.Sequential(layer, module)


def _export_module(net, chw, fixed, ref, x, what, kind) -> tuple[bytes | None, list[str]]:
    """The module's ONNX twin (dynamic batch unless ``fixed``), checked against the module's outputs."""
    sample = torch.from_numpy(x[: fixed or 1]).to(_device_of(net))
    buf = io.BytesIO()
    dynamic = None if fixed else {"input": {0: "batch"}, kind: {0: "batch"}}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (sample,),
                buf,
                dynamo=False,
                input_names=["input"],
                output_names=[kind],
                dynamic_axes=dynamic,
            )
        session = _session_or_error(buf.getvalue(), what)
        got = _run_fixed(session, np.ascontiguousarray(x), fixed)
    except Exception as exc:  # noqa: BLE001 - exporters fail in many ways
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return None, [
            f"{what} does not export to ONNX ({first}): Monte Carlo runs it on torch, and the bundle "
            f"cannot carry it as its base model for audits"
        ]
    if got.shape != ref.shape or not np.allclose(got, ref, rtol=1e-3, atol=1e-4):
        diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
        return None, [
            f"{what}'s ONNX export differs from the module (max |Δ| {diff:.3g} on probe inputs): Monte "
            f"Carlo runs it on torch, and the bundle cannot carry it as its base model"
        ]
    return buf.getvalue(), []


def _weights_source(weights) -> dict:
    if weights is None:
        return {"weights": None}
    return {"weights": str(Path(weights).resolve()), "weights_sha256": file_sha256(weights)}


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
                f"{what} holds a dict that is not a state dict (keys: {_short_list(list(state))})"
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


@contextlib.contextmanager
def cwd_on_path():
    """The current folder on ``sys.path`` while importing (a console script does not put it there)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def import_attribute(
    module_name: str,
    attr: str,
    what: str,
    *,
    error: type[Exception] = UserModelError,
    prefix: str = "rrise_user",
) -> tuple[Any, Any]:
    """``(object, module)`` for ``attr`` (dotted) of ``module_name`` (an importable name, or a
    ``.py`` file loaded as ``<prefix>_<stem>``), the current folder on ``sys.path``. Every failure is
    an ``error`` that names ``what``."""
    try:
        with cwd_on_path():
            if module_name.endswith(".py"):
                file = Path(module_name)
                if not file.is_file():
                    raise error(f"{what}: {file} does not exist")
                spec = importlib.util.spec_from_file_location(f"{prefix}_{file.stem}", file)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            else:
                mod = importlib.import_module(module_name)
    except error:
        raise
    except ModuleNotFoundError as exc:
        raise error(
            f"{what}: cannot import {module_name} ({exc}); is it installed, or in the current folder?"
        ) from None
    except Exception as exc:  # noqa: BLE001 - anything the user's module raises on import
        raise error(f"{what}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj, mod


def _from_factory(text: str, module_name: str, attr: str, weights, opts: _Options) -> UserModel:
    what = f"MODEL {text}"
    obj, mod = import_attribute(module_name, attr, what, prefix="rrise_user_model")
    if isinstance(obj, nn.Module):
        module = obj
    elif callable(obj):
        try:
            module = obj()
        except Exception as exc:  # noqa: BLE001
            raise UserModelError(f"{what}: calling {attr}() raised {type(exc).__name__}: {exc}") from None
        if not isinstance(module, nn.Module):
            raise UserModelError(
                f"{what}: {attr}() returned a {type(module).__name__}, not a torch nn.Module"
            )
    else:
        raise UserModelError(
            f"{what}: {attr} is a {type(obj).__name__}, not an nn.Module or a function returning one"
        )
    notes = []
    if weights is not None:
        notes += load_weights(module, weights)
    source = {"form": "factory", "factory": text, **_weights_source(weights)}
    file = getattr(mod, "__file__", None)
    if file and Path(file).is_file():
        source["factory_file"] = str(Path(file).resolve())
        source["factory_file_sha256"] = file_sha256(file)
    um = _from_module(module.eval(), source, opts, what=what)
    if weights is None:
        notes.append(f"{what}: no --weights given; using the weights the factory gives")
    um.notes = tuple(notes) + um.notes
    return um


def check_pt2_has_no_code(path: Path, what: str) -> None:
    """Refuse a ``torch.export`` archive whose loading would unpickle anything but plain tensors.

    ``torch.export.load`` reads some members with torch's unrestricted loader (payloads saved with
    pickle, legacy weight files, sample inputs that the restricted loader rejects, custom and opaque
    objects): a crafted archive runs code there. So this scan runs first, and :func:`_from_pt2` calls
    ``torch.export.load`` only on an archive that passed it: every such member must load with
    ``torch.load(weights_only=True)``, and custom and opaque objects are refused.
    """
    from torch.export.pt2_archive import constants as k
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(str(path))
        names = list(reader.get_file_names())
    except Exception as exc:  # noqa: BLE001
        raise UserModelError(f"{what} is not a readable torch.export archive: {exc}") from None
    pickled = [n for n in names if n.startswith(k.SAMPLE_INPUTS_DIR)]
    pickled += [n for n in names if n.startswith((k.WEIGHTS_DIR, k.CONSTANTS_DIR)) and n.endswith(".pt")]
    for name in names:
        if not name.startswith((k.WEIGHTS_DIR, k.CONSTANTS_DIR)) or not name.endswith("_config.json"):
            continue
        try:
            entries = json.loads(reader.read_string(name)).get("config", {}).values()
        except (ValueError, AttributeError) as exc:
            raise UserModelError(f"{what}: {name} is not a valid payload config: {exc}") from None
        for entry in entries:
            member = entry.get("path_name", "") if isinstance(entry, dict) else ""
            if member.startswith((k.CUSTOM_OBJ_FILENAME_PREFIX, k.OPAQUE_OBJ_FILENAME_PREFIX)):
                raise UserModelError(
                    f"{what} holds a Python object ({member}) that loads by unpickling, which could run "
                    f"code: export the model with tensors only, or use its ONNX"
                )
            if isinstance(entry, dict) and entry.get("use_pickle"):
                pickled.append(name.rsplit("/", 1)[0] + "/" + member)
    for name in pickled:
        try:
            torch.load(io.BytesIO(reader.read_bytes(name)), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UserModelError(
                f"{what}: {name} does not load as plain tensors (torch.load(weights_only=True): "
                f"{str(exc).splitlines()[0]}); refusing to unpickle it"
            ) from None


def _from_pt2(path: Path, opts: _Options) -> UserModel:
    what = f"MODEL {path}"
    check_pt2_has_no_code(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        gpu = _gpu_message(what, exc)
        raise UserModelError(gpu or f"{what} is not a readable torch.export archive: {exc}") from None
    user_inputs = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != 1:
        raise UserModelError(
            f"{what} takes {len(user_inputs)} inputs ({', '.join(map(str, user_inputs))}); the SDK needs one"
        )
    val = nodes[user_inputs[0]].meta.get("val") if user_inputs[0] in nodes else None
    if val is None or not hasattr(val, "shape") or len(val.shape) != 4:
        raise UserModelError(f"{what}: its input is not a 4-dimensional NCHW tensor")
    dims = [int(d) if isinstance(d, int) else None for d in val.shape]
    if val.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise UserModelError(f"{what}: its input is {val.dtype}; the SDK feeds float32 pixels in [0, 1]")
    if val.dtype != torch.float32:
        raise UserModelError(f"{what}: its input is {val.dtype}; export it with a float32 input")
    source = {"form": "pt2", "path": str(path.resolve()), "sha256": file_sha256(path)}
    try:
        graph_module = ep.module(check_guards=False)
    except TypeError:  # older torch
        graph_module = ep.module()
    batch, c, h, w = dims
    notes = []
    module: nn.Module = _Exported(graph_module)
    if batch is not None:
        module, batch, note = _lift_batch(graph_module, module, batch, dims, what)
        notes += note

    def static_twin(chw):  # the graph re-exported at a static batch of 1 (no SymInts: it traces)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = torch.export.export(ep.module(), (torch.zeros(1, *chw, dtype=torch.float32),))
        return _Exported(again.module())

    um = _from_module(module, source, opts, what=what, static=(batch, c, h, w), export_twin=static_twin)
    um.notes = tuple(notes) + um.notes
    return um


def _lift_batch(graph_module, module, batch: int, dims, what) -> tuple[nn.Module, int | None, list[str]]:
    """A module exported at a static batch size: drop the input-shape check when the graph gives the
    same per-input outputs on a batch of 3 as one input at a time (else run it in fixed chunks)."""
    hooks = graph_module._forward_pre_hooks
    saved = dict(hooks)
    for k, hook in list(hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del hooks[k]
    x = torch.from_numpy(_probe_inputs(tuple(dims[1:]), _PROBE_BATCH))
    try:
        with torch.inference_mode():
            together = module(x)
            if batch == 1:
                alone = torch.cat([module(x[i : i + 1]) for i in range(len(x))])
            else:
                alone = _FixedBatch(module, batch)(x)
        same = isinstance(together, torch.Tensor) and together.shape == alone.shape
        if same and torch.allclose(together, alone, rtol=1e-4, atol=1e-5):
            return (
                module,
                None,
                [f"{what} was exported with batch size {batch}; it runs on any batch size"],
            )
    except Exception:  # noqa: BLE001, S110 - the graph is specialized to its batch size
        pass
    hooks.clear()
    hooks.update(saved)
    return (
        _FixedBatch(module, batch),
        batch,
        [
            f"{what} only runs batches of {batch} (exported with a static batch): Monte Carlo runs it "
            f"{batch} draw(s) per forward pass; export with a dynamic batch "
            f"(dynamic_shapes={{'x': {{0: Dim.DYNAMIC}}}}) to run much faster"
        ],
    )
