"""Inference backends: ``[B, C, H, W]`` float32 in, ``[B, K]`` class probabilities out.

``OnnxRuntimeBackend`` runs an ONNX variant on exactly the execution providers its quantile was
calibrated with (:func:`rrise.onnx_session.open_session`); ``TensorRTBackend`` runs a serialized
TensorRT 10/11 engine with pycuda (:mod:`rrise.trt_session`, shared with export's recalibration).
Both are imported lazily, so the runtime never needs the backend it does not use.

Each variant carries its own conformal quantile (docs/CERTIFICATE.md, "Numerics"): whichever backend
:func:`make_backend` picks, it returns the variant entry too, and the caller must certify with that
variant's calibration, handing the backend no batch larger than :func:`variant_max_batch`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rrise.numerics import MICRO_BATCH_LIMIT, to_probs
from rrise.onnx_session import open_session
from rrise.trt_session import (
    TENSORRT_HELP,
    TensorRTBackend,
    check_batch_input,
    check_output_kind,
    device_compute_capability,
    engine_mismatch,
    installed_tensorrt_version,
    pick_name,
    tensorrt_available,
)

if TYPE_CHECKING:
    from rrise.bundle import Bundle

__all__ = [
    "BACKENDS",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "make_backend",
    "tensorrt_available",
    "variant_max_batch",
]

log = logging.getLogger("rrise.runtime")

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def variant_max_batch(variant: dict[str, Any]) -> int:
    """The largest batch ``variant``'s backend may be handed: its ``max_batch`` (the largest
    micro-batch at which its outputs were checked equal to the calibrated batch-1 outputs), 1 when
    the manifest does not say. Anything but an integer in [1, MICRO_BATCH_LIMIT] is refused."""
    value = variant.get("max_batch", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MICRO_BATCH_LIMIT:
        raise ValueError(
            f"variant {variant.get('precision')}/{variant.get('backend')} has max_batch {value!r}: "
            f"expected an integer in [1, {MICRO_BATCH_LIMIT}]"
        )
    return value


class OnnxRuntimeBackend:
    """An ONNX model (a path, or its serialized bytes: a bundle's variant is opened from the bytes
    its sha256 was checked on, :meth:`rrise.Bundle.read_verified`) under onnxruntime, on the
    execution providers ``calibrated_with`` names (``"onnxruntime-cpu"``, ``"onnxruntime-cuda"``, or
    ``"fastest"`` for uncalibrated uses); ``where`` names it in errors. ``run(x)`` → ``[B, K]``
    float64 probabilities."""

    def __init__(
        self,
        model: str | Path | bytes,
        calibrated_with: str = "onnxruntime-cpu",
        *,
        input_name: str | None = None,
        output_name: str | None = None,
        output_kind: str = "logits",
        where: str | None = None,
    ) -> None:
        self.output_kind = check_output_kind(output_kind)
        self.calibrated_with = calibrated_with
        self.session = open_session(model, calibrated_with)
        where = where or ("the serialized model" if isinstance(model, bytes) else model)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = pick_name(input_name, [i.name for i in inputs], "input", where)
        self.output_name = pick_name(output_name, [o.name for o in outputs], "output", where)
        self._outputs = [self.output_name]
        batch = next(i.shape[0] for i in inputs if i.name == self.input_name)
        # The most rows one call takes (a model exported with a fixed batch); None: any. Not the
        # variant's ``max_batch`` (exact numerics), which the Runtime enforces before calling.
        self.batch_capacity = batch if isinstance(batch, int) and batch > 0 else None
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime[{self.providers[0]}]"

    def run(self, x: np.ndarray) -> np.ndarray:
        x = check_batch_input(x)
        run, step = self.session.run, self.batch_capacity
        if step is None or len(x) <= step:
            out = run(self._outputs, {self.input_name: x})[0]
        else:
            out = np.concatenate(
                [run(self._outputs, {self.input_name: x[i : i + step]})[0] for i in range(0, len(x), step)]
            )
        return to_probs(out, self.output_kind)


def _variants(bundle: Bundle, backend: str, precision: str | None) -> list[dict[str, Any]]:
    found = [v for v in bundle.manifest["variants"] if v.get("backend") == backend]
    if precision is not None:
        found = [v for v in found if v.get("precision") == precision]
    uncalibrated = [v for v in found if v.get("quantile") is None]
    found = [v for v in found if v.get("quantile") is not None]  # never run without its own quantile
    if not found and uncalibrated and precision is not None:
        v = uncalibrated[0]
        raise RuntimeError(
            f"the {v.get('precision')}/{backend} variant of {bundle.path} has no quantile of its own and "
            f"cannot be run: {v.get('needs_recalibration')}"
        )
    if backend == "onnxruntime":  # most faithful first: fp32, then fp16, then int8
        order = {"fp32": 0, "fp16": 1, "int8": 2}
        found.sort(key=lambda v: order.get(str(v.get("precision")), 3))
    return found


def _rebuild_command(bundle: Bundle, variant: dict[str, Any]) -> str:
    """The command that rebuilds ``variant``'s engine on this device, recalibrating its quantile."""
    precision = variant.get("precision", "fp32")
    return f"rrise-export --engine tensorrt --precision {precision} --bundle {bundle.path}"


def _pick_engine(variants: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The engine built for this GPU and TensorRT version (engines do not move between them)."""
    for v in variants:
        if engine_mismatch(v) is None:
            return v
    return None


def _build(bundle: Bundle, variant: dict[str, Any]) -> OnnxRuntimeBackend | TensorRTBackend:
    model = bundle.manifest["model"]
    kwargs = {
        "input_name": model.get("input", {}).get("name"),
        "output_name": model.get("output", {}).get("name"),
        "output_kind": variant.get("output_kind", model.get("output", {}).get("kind", "logits")),
    }
    where = str(bundle.path / variant["file"])
    if variant.get("backend") == "tensorrt":
        mismatch = engine_mismatch(variant)
        if mismatch is not None:
            raise RuntimeError(
                f"{mismatch}: rebuild it on this device with `{_rebuild_command(bundle, variant)}`"
            )
        # Deserialized from the bytes whose sha256 was checked: the file cannot change in between.
        return TensorRTBackend(
            bundle.read_verified(variant["file"], variant.get("sha256")), where=where, **kwargs
        )
    calibrated_with = variant.get("calibrated_with")
    if calibrated_with is None:
        raise RuntimeError(
            f"the {variant.get('precision')}/onnxruntime variant of {bundle.path} does not say which "
            "numerics its quantile was calibrated with (calibrated_with); re-export the bundle"
        )
    # Its quantile holds for those numerics only: another provider would run other kernels. The
    # session opens the bytes whose sha256 was checked, never the path again.
    data = bundle.read_verified(variant["file"], variant.get("sha256"))
    return OnnxRuntimeBackend(data, calibrated_with, where=where, **kwargs)


def make_backend(
    bundle: Bundle, backend: str = "auto", *, precision: str | None = None
) -> tuple[OnnxRuntimeBackend | TensorRTBackend, dict[str, Any]]:
    """The backend for ``bundle`` and the variant it runs (certify with that variant's quantile).

    ``auto`` uses a TensorRT engine when the bundle has one for this GPU and tensorrt + pycuda
    import, else onnxruntime. ``precision`` restricts the choice to one variant precision.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "tensorrt"):
        engines = _variants(bundle, "tensorrt", precision)
        if backend == "tensorrt":
            if not engines:
                raise RuntimeError(
                    f"bundle {bundle.path} has no TensorRT engine variant"
                    f"{'' if precision is None else f' at {precision}'}: {TENSORRT_HELP}"
                )
            if not tensorrt_available():
                raise RuntimeError(f"tensorrt and pycuda do not import here: {TENSORRT_HELP}")
        if engines and tensorrt_available():
            variant = _pick_engine(engines)
            if variant is None:
                msg = (
                    f"no TensorRT engine in {bundle.path} matches this GPU "
                    f"(compute capability {device_compute_capability()}) and TensorRT "
                    f"{installed_tensorrt_version()}: {engine_mismatch(engines[0])}; rebuild it on this "
                    f"device with `{_rebuild_command(bundle, engines[0])}`"
                )
                if backend == "tensorrt":
                    raise RuntimeError(msg)
                log.warning("%s; using onnxruntime", msg)
            else:
                try:
                    return _build(bundle, variant), variant
                except RuntimeError as exc:
                    if backend == "tensorrt":
                        raise
                    log.warning("TensorRT engine unusable (%s); using onnxruntime", exc)
    candidates = _variants(bundle, "onnxruntime", precision)
    if not candidates:
        have = ", ".join(f"{v.get('precision')}/{v.get('backend')}" for v in bundle.manifest["variants"])
        raise RuntimeError(
            f"bundle {bundle.path} has no onnxruntime variant"
            f"{'' if precision is None else f' at {precision}'} (has {have})"
        )
    variant = candidates[0]
    return _build(bundle, variant), variant
