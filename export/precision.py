"""The precisions a bundle variant can have, and its file names: one definition for every CLI.

Plain Python (no numpy, no onnx): ``rrise --help`` and ``rrise-export --help`` import it.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["BACKENDS", "DEFAULT_QUANT_SAMPLES", "ENGINES", "PRECISIONS", "Precision", "variant_file_name"]

PRECISIONS = ("fp32", "int8", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
ENGINES = ("tensorrt",)  # the backends whose variant is an engine built on the device that runs it
DEFAULT_QUANT_SAMPLES = 1000  # int8: at most this many selection images set the activation ranges

# The --precision choices of `rrise-export` and `rrise run`, made from PRECISIONS.
Precision = Enum("Precision", [(p, p) for p in PRECISIONS], type=str, module=__name__)


def variant_file_name(precision: str, backend: str = "onnxruntime") -> str:
    """The bundle file name of a variant: ``surrogate.int8.onnx``, ``surrogate.fp16.engine``, ..."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "onnxruntime":
        return "surrogate.onnx" if precision == "fp32" else f"surrogate.{precision}.onnx"
    if backend == "tensorrt":
        return f"surrogate.{precision}.engine"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
