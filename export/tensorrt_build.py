"""ONNX → TensorRT engine, built on the machine that will run it (a Jetson).

TensorRT and pycuda are imported only when a function here is called; without them every function
raises RuntimeError saying how to install them. Supported: TensorRT 10 and 11.

- TensorRT 10 networks are explicit-batch by default, so the network is created with flags 0; the
  ``EXPLICIT_BATCH`` flag is set only on older versions that still need it.
- TensorRT 11 removed the precision builder flags (``BuilderFlag.FP16``): networks are strongly
  typed and an engine's precision is the ONNX's own tensor types. There, ``fp16=True`` needs an
  ONNX that already holds float16 tensors, and ``build_engine`` refuses an all-float32 one rather
  than silently building an fp32 engine.

An engine is tied to the GPU (compute capability) and TensorRT version it was built with; the
bundle records both (:func:`engine_info`), and its quantile must be recalibrated from the engine's
own outputs, run through the engine runner the runtime uses too
(:class:`rrise.trt_session.TensorRTBackend`) at the runtime's batch sizes, so the numbers are the
ones deployment will see: :mod:`rrise.export.engine` does that.

:func:`build_base_engine` builds the base classifier's engine, which adaptive certification runs its
Monte Carlo draws through (``rrise run --backend tensorrt --mc-budget N``): fp32 numerics, with no
reduced-precision flag (TensorRT 11 has none) and TF32 cleared where the builder has it, so the
engine computes the base classifier the bundle's ONNX holds as closely as the GPU allows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rrise.fileio import atomic_write_bytes

from .onnx_export import INPUT_NAME

__all__ = ["INSTALL_HINT", "build_base_engine", "build_engine", "engine_info", "require_tensorrt"]

INSTALL_HINT = (
    "install it on the target device with `pip install 'rrise[tensorrt]'` (TensorRT wheels come from "
    "NVIDIA's package index, https://pypi.nvidia.com; on a Jetson, JetPack ships TensorRT)"
)


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise RuntimeError with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(f"TensorRT is not installed on this machine: {INSTALL_HINT}") from exc
    return trt


def _require_pycuda():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise RuntimeError(f"pycuda is not installed on this machine: {INSTALL_HINT}") from exc
    cuda.init()
    return cuda


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _network_has_half(trt, network) -> bool:
    half = trt.DataType.HALF
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        tensors += [layer.get_output(j) for j in range(layer.num_outputs)]
    return any(t is not None and t.dtype == half for t in tensors)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    timing_cache: str | os.PathLike | None = None,
    fp16: bool = False,
    strongly_typed: bool = False,
) -> Path:
    """Build a serialized TensorRT engine from ``onnx_path`` and write it atomically to ``engine_path``.

    The engine takes ``input`` with any batch in ``[min_batch, max_batch]`` (tuned for
    ``opt_batch``). ``timing_cache`` (a file) is read if it exists and written back after the build,
    which makes rebuilds much faster. ``fp16`` sets ``BuilderFlag.FP16`` where it exists (TensorRT
    10); on TensorRT 11 the precision comes from the ONNX (see the module docstring).
    ``strongly_typed`` builds a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
    the default on TensorRT 11): every tensor keeps the ONNX's own type, which is how the bundle's
    fp16 ONNX and int8 QDQ ONNX become fp16 and int8 engines; it excludes ``fp16``. Raises
    RuntimeError if TensorRT is missing, the ONNX does not parse, or the build fails.
    """
    trt = require_tensorrt()
    if strongly_typed and fp16:
        raise ValueError(
            "fp16 (a builder flag) and strongly_typed exclude each other: a strongly typed network takes "
            "its precision from the ONNX, so build it from the bundle's fp16 ONNX instead"
        )
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)  # the network keeps no reference to its parser: keep it alive
    _parse(trt, parser, network, onnx_path)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    config = _builder_config(trt, builder, network, (min_batch, opt_batch, max_batch), cache_path)
    if fp16:
        _set_fp16(trt, config, network, onnx_path)
    return _serialize(builder, network, config, (onnx_path, engine_path), cache_path)


def build_base_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    max_batch: int,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build the base classifier's engine from its ONNX (``base_model.file``) with fp32 numerics and
    write it atomically to ``engine_path``: no FP16/INT8 builder flag, TF32 cleared where the builder
    has the flag, a network created as :func:`build_engine` creates an fp32 one. The base ONNX may
    name its one input anything; a dynamic batch gets the profile ``[1, max_batch]`` tuned for
    ``max_batch`` (Monte Carlo hands it whole batches of draws), a fixed batch stays as it is.
    Raises RuntimeError if TensorRT is missing, the ONNX does not parse, or the build fails."""
    trt = require_tensorrt()
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, False))
    parser = trt.OnnxParser(network, logger)  # kept alive while the network is
    _parse(trt, parser, network, onnx_path, input_name=None)
    batch = tuple(network.get_input(0).shape)[0]
    batches = (1, max_batch, max_batch) if batch == -1 else (batch, batch, batch)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    config = _builder_config(trt, builder, network, batches, cache_path)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    return _serialize(builder, network, config, (onnx_path, engine_path), cache_path)


def _serialize(builder, network, config, paths: tuple, cache_path: Path | None) -> Path:
    """Build ``network`` with ``config``, write the timing cache back and the engine to ``paths[1]``."""
    onnx_path, engine_path = paths
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return atomic_write_bytes(engine_path, bytes(serialized))


def _network_flags(trt, strongly_typed: bool) -> int:
    """Network creation flags: explicit batch where TensorRT still needs the flag (< 10), and
    ``STRONGLY_TYPED`` when asked (refused on a TensorRT that cannot do it)."""
    flags = 0
    if _major(trt) < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is not None:
            flags |= 1 << int(strong)
        elif _major(trt) < 11:
            raise RuntimeError(
                f"TensorRT {trt.__version__} cannot build strongly typed networks; install TensorRT 10 or 11"
            )
    return flags


def _parse(trt, parser, network, onnx_path: str | os.PathLike, input_name: str | None = INPUT_NAME) -> None:
    """Parse the ONNX file into ``network``; it must have exactly one input, named ``input_name``
    unless that is None."""
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors or 'unknown error'}")
    if network.num_inputs != 1:
        raise RuntimeError(f"{onnx_path} must have exactly one input, it has {network.num_inputs}")
    if input_name is not None and network.get_input(0).name != input_name:
        raise RuntimeError(f"{onnx_path} must have exactly one input named {input_name!r}")


def _builder_config(trt, builder, network, batches: tuple[int, int, int], cache_path: Path | None):
    """A builder config with one optimization profile over ``batches`` (min, opt, max) and the
    timing cache read from ``cache_path`` (empty when there is none yet)."""
    tensor = network.get_input(0)
    _, c, h, w = tuple(tensor.shape)
    profile = builder.create_optimization_profile()
    lo, opt, hi = ((b, c, h, w) for b in batches)
    profile.set_shape(tensor.name, lo, opt, hi)
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    return config


def _set_fp16(trt, config, network, onnx_path: str | os.PathLike) -> None:
    """``BuilderFlag.FP16`` where it exists (TensorRT 10); TensorRT 11 takes the precision from the
    ONNX, so an all-float32 network is refused rather than silently built as fp32."""
    if hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    elif not _network_has_half(trt, network):
        raise RuntimeError(
            f"TensorRT {trt.__version__} has no FP16 builder flag: an engine's precision is the "
            f"ONNX's own tensor types, and {onnx_path} is float32 throughout. Export a float16 ONNX "
            "to build an fp16 engine."
        )


def engine_info() -> dict[str, Any]:
    """``{"trt_version": "10.3.0", "compute_capability": "8.7", "device": name}`` of this machine's
    TensorRT and GPU 0: what a bundle records beside an engine built here."""
    trt = require_tensorrt()
    cuda = _require_pycuda()
    dev = cuda.Device(0)
    major, minor = dev.compute_capability()
    return {
        "trt_version": str(trt.__version__),
        "compute_capability": f"{major}.{minor}",
        "device": dev.name(),
    }
