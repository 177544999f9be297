"""The user's classifier in the SDK's canonical form (:class:`UserModel`), the options it was
loaded with (:class:`ModelOptions`) and the checks every importer applies to it (input shape, probe
inputs, output kind). See :mod:`rrise.calibrate.user_model` for the forms and the canonical form.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rrise.fileio import atomic_write_bytes

from .mc import BACKENDS, PreparedModel, module_device, open_onnx_session
from .specs import CHANNELS, OUTPUT_KINDS

PROBS_ATOL = 1e-3  # rows within this of summing to 1 (and non-negative) are probabilities
PROBE_BATCH = 3


class UserModelError(ValueError):
    """The user's model or its options cannot be used; the message names the file or option."""


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
            self._session = open_onnx_session(self.onnx)
        return self._session

    def check_classes(
        self, num_classes: int, classes: Sequence[str] | None = None, data: str = "DATA"
    ) -> None:
        """Raise unless the data's class count equals the model's K (``data`` names the data)."""
        if int(num_classes) != self.num_classes:
            names = "" if classes is None else f" ({short_list(list(classes))})"
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
                outs.append(run_fixed(self.session(), part, self.fixed_batch))
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
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        on_gpu = self.module is not None and module_device(self.module).type != "cpu"
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


@dataclass(frozen=True)
class ModelOptions:
    output: str | None
    output_kind: str | None
    input_size: tuple[int, int] | None
    channels: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @staticmethod
    def make(output, output_kind, input_size, channels, mean, std) -> ModelOptions:
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
        return ModelOptions(output, output_kind, size, channels, m, s)

    def per_channel(self, c: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        if self.mean is None:
            return None
        for name, v in (("--mean", self.mean), ("--std", self.std)):
            if len(v) not in (1, c):
                raise UserModelError(f"{name} needs 1 or {c} values for a {c}-channel model, got {len(v)}")
        return tuple(np.broadcast_to(self.mean, (c,)).tolist()), tuple(
            np.broadcast_to(self.std, (c,)).tolist()
        )


def resolve_shape(
    what: str, c: int | None, h: int | None, w: int | None, opts: ModelOptions, static_from: str
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


def probe_inputs(shape: tuple[int, int, int], batch: int = PROBE_BATCH) -> np.ndarray:
    """Deterministic probe images in [0, 1]: all zeros, all ones, then uniform noise."""
    x = np.random.default_rng(0).random((max(batch, 1), *shape), dtype=np.float32)
    x[0] = 0.0
    if batch > 1:
        x[1] = 1.0
    return x[:batch]


def detect_output_kind(out: np.ndarray, requested: str | None, what: str) -> tuple[str, list[str]]:
    """``logits`` or ``probs`` from probe outputs and the request; notes; raises on a contradiction."""
    sums = out.astype(np.float64).sum(axis=1)
    probs = bool(np.all(out >= -1e-6) and np.all(np.abs(sums - 1.0) <= PROBS_ATOL))
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


def check_finite_probe(out: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        names = {0: "the all-zero image", 1: "the all-one image"}
        i = int(bad[0])
        raise UserModelError(
            f"{what} outputs NaN or inf on probe input index {i} ({names.get(i, 'a uniform-noise image')})"
        )


def short_list(items: list, limit: int = 8) -> str:
    text = ", ".join(str(v) for v in items[:limit])
    return text + (f", … ({len(items)} in all)" if len(items) > limit else "")


_GPU_HINTS = ("cuda", "gpu", "tensorrt", "could not find an implementation")


def gpu_message(what: str, exc: BaseException) -> str | None:
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


def session_or_error(model: bytes, what: str):
    try:
        return open_onnx_session(model)
    except Exception as exc:  # noqa: BLE001 - open_session raises ValueError/RuntimeError with ORT's text
        gpu = gpu_message(what, exc)
        text = str(exc).replace("onnxruntime cannot load serialized model: ", "")
        raise UserModelError(gpu or f"{what}: onnxruntime cannot run it: {text}") from None


def choose_output(names: list[str], outs: list, batch: int, requested: str | None, what: str):
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


def run_fixed(session, x: np.ndarray, fixed_batch: int | None) -> np.ndarray:
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
