"""An ONNX image classifier as a trainable torch module (:func:`onnx_to_torch`), so a surrogate can
start from the weights of a base model given only as ONNX.

The graph runs node by node, in topological order, in ``forward``. Float initializers in weight
slots (Conv, Gemm and MatMul operands, a bias or scale added to or multiplied with their output)
become ``nn.Parameter``; ``BatchNormalization`` becomes a batch-norm layer holding the running
statistics (trainable affine; in eval mode it computes exactly what the ONNX node does); every other
constant (a normalization, a shape, a ``Constant`` node) is a buffer or folded at import time.
``Shape`` → ``Gather``/``Unsqueeze``/``Concat`` chains fold to shapes whose dynamic sizes (the
batch) are read from the tensor when the module runs, so the module exports to ONNX again with a
dynamic batch axis. An operator outside the supported set (:data:`SUPPORTED_OPS`) raises
:class:`UnsupportedOperator` before any module is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED_OPS", "OnnxModule", "UnsupportedOperator", "onnx_to_torch"]

_WEIGHT_OPS = {"Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}  # input slots holding weights
_AFFINE_OPS = ("Add", "Mul", "Sub", "Div")  # a float initializer here is a weight after _PRODUCERS
_PRODUCERS = ("Conv", "Gemm", "MatMul", "BatchNormalization")
_SHAPE_OPS = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity")  # ops on folded shapes


class UnsupportedOperator(ValueError):
    """The ONNX graph uses an operator (or an operator form) the importer does not support."""


@dataclass(frozen=True)
class _Dim:
    """A size known only when the module runs: dimension ``axis`` of value ``value``."""

    value: str
    axis: int


@dataclass
class _Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Operators


def _pairs(pads: Sequence[int], n: int) -> list[tuple[int, int]]:
    """ONNX pads ``[b1, .., bn, e1, .., en]`` as ``[(b1, e1), ..]``."""
    pads = list(pads) if pads else [0] * (2 * n)
    return [(int(pads[i]), int(pads[i + n])) for i in range(n)]


def _torch_pad(pairs: list[tuple[int, int]]) -> list[int]:
    """Per-axis ``(begin, end)`` pairs (first spatial axis first) as F.pad's last-axis-first list."""
    return [p for pair in reversed(pairs) for p in pair]


def _spatial_pads(a: dict, x: torch.Tensor, kernel: Sequence[int]) -> list[tuple[int, int]]:
    """The ``(begin, end)`` padding per spatial axis, ``auto_pad`` resolved for ``x``'s sizes."""
    n = len(kernel)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    strides = a.get("strides") or [1] * n
    dil = a.get("dilations") or [1] * n
    if auto in ("NOTSET", ""):
        return _pairs(a.get("pads"), n)
    if auto == "VALID":
        return [(0, 0)] * n
    pairs = []
    for i in range(n):
        size = int(x.shape[2 + i])
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size)
        small, big = total // 2, total - total // 2
        pairs.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return pairs


def _split_pads(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int] | None]:
    """Symmetric padding for the layer, plus an explicit F.pad list when begin ≠ end somewhere."""
    if all(b == e for b, e in pairs):
        return [b for b, _ in pairs], None
    return [0] * len(pairs), _torch_pad(pairs)


def _conv(m: _Run, n: _Node, x, w, b=None):
    a = n.attrs
    k = list(w.shape[2:])
    same, extra = _split_pads(_spatial_pads(a, x, a.get("kernel_shape") or k))
    if extra is not None:
        x = F.pad(x, extra)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(k)]
    strides = a.get("strides") or [1] * len(k)
    dil = a.get("dilations") or [1] * len(k)
    return fn(x, w, b, strides, same, dil, int(a.get("group", 1)))


def _gemm(m: _Run, n: _Node, x, w, c=None):
    a = n.attrs
    x = x.transpose(0, 1) if a.get("transA", 0) else x
    w = w.transpose(0, 1) if a.get("transB", 0) else w
    y = torch.matmul(x, w)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    y = y * alpha if alpha != 1.0 else y
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _batch_norm(m: _Run, n: _Node, x, *_stats):
    return m.batch_norm(n.outputs[0])(x)


def _clip(m: _Run, n: _Node, x, lo=None, hi=None):
    lo = n.attrs.get("min") if lo is None else lo
    hi = n.attrs.get("max") if hi is None else hi
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(x, min=lo, max=hi)


def _div(m: _Run, n: _Node, x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _pool(m: _Run, n: _Node, x):
    a = n.attrs
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = a.get("strides") or [1] * nd
    ceil = bool(a.get("ceil_mode", 0))
    pairs = _spatial_pads(a, x, kernel)
    same, extra = _split_pads(pairs)
    if n.op == "MaxPool":
        if extra is not None:
            x = F.pad(x, extra, value=float("-inf"))
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        return fn(x, kernel, strides, same, a.get("dilations") or [1] * nd, ceil)
    include = bool(a.get("count_include_pad", 0))
    if extra is not None:
        if not include:
            raise UnsupportedOperator(
                f"AveragePool node {n.name!r}: uneven padding without count_include_pad"
            )
        x, same = F.pad(x, extra), [0] * nd
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    return fn(x, kernel, strides, same, ceil, include)


def _flatten(m: _Run, n: _Node, x):
    axis = int(n.attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    if axis == 1:
        return torch.flatten(x, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(m: _Run, n: _Node, x, shape):
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, _Dim):
            dims.append(m.env_dim(d))
        elif int(d) == 0 and not n.attrs.get("allowzero", 0):
            dims.append(x.shape[i])
        else:
            dims.append(int(d))
    return x.reshape(dims)


def _softmax(m: _Run, n: _Node, x):
    axis = int(n.attrs.get("axis", -1 if m.opset >= 13 else 1))
    fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
    if m.opset >= 13 or axis in (-1, x.dim() - 1):
        return fn(x, axis)
    lead = x.shape[:axis]
    return fn(x.reshape(int(np.prod(lead)), -1), 1).reshape(x.shape)


def _transpose(m: _Run, n: _Node, x):
    perm = n.attrs.get("perm") or list(reversed(range(x.dim())))
    return x.permute(*[int(p) for p in perm])


def _axes(n: _Node, given) -> list[int] | None:
    axes = n.attrs.get("axes") if given is None else given
    return None if axes is None else [int(a) for a in np.atleast_1d(np.asarray(axes))]


def _squeeze(m: _Run, n: _Node, x, axes=None):
    axes = _axes(n, axes)
    if axes is None:
        return torch.squeeze(x)
    for a in sorted((a + x.dim() if a < 0 else a for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(m: _Run, n: _Node, x, axes=None):
    axes = _axes(n, axes)
    rank = x.dim() + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def _pad(m: _Run, n: _Node, x, pads=None, value=None, axes=None):
    mode = n.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode != "constant" or axes is not None:
        raise UnsupportedOperator(f"Pad node {n.name!r}: only constant padding over all axes")
    pads = n.attrs.get("pads") if pads is None else [int(p) for p in pads]
    fill = float(n.attrs.get("value", 0.0) if value is None else value)
    return F.pad(x, _torch_pad(_pairs(pads, x.dim())), value=fill)


def _reduce_mean(m: _Run, n: _Node, x, axes=None):
    axes = _axes(n, axes)
    keep = bool(n.attrs.get("keepdims", 1))
    if axes is None or len(axes) == 0:
        return x.mean(dim=list(range(x.dim())), keepdim=keep) if keep else x.mean()
    return x.mean(dim=axes, keepdim=keep)


def _gather(m: _Run, n: _Node, x, idx):
    axis = int(n.attrs.get("axis", 0))
    idx_t = torch.as_tensor(idx, dtype=torch.int64)
    if idx_t.dim() == 0:
        return x.select(axis, int(idx_t))
    return torch.index_select(x, axis, idx_t.flatten()).reshape(
        *x.shape[:axis], *idx_t.shape, *x.shape[axis + 1 :]
    )


def _cast(m: _Run, n: _Node, x):
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(int(n.attrs["to"]))
    return x.to(torch.from_numpy(np.zeros(0, dtype)).dtype)


def _slice_index(n: _Node, rank: int, starts, ends, axes=None, steps=None) -> tuple:
    """The Python index of a ``Slice`` node (starts/ends clamped by Python's slice semantics)."""
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.atleast_1d(axes)]
    steps = [1] * len(axes) if steps is None else [int(s) for s in np.atleast_1d(steps)]
    index = [slice(None)] * rank
    big = 2**62
    for a, b, e, st in zip(axes, np.atleast_1d(starts), np.atleast_1d(ends), steps, strict=True):
        b, e = int(max(min(b, big), -big)), int(max(min(e, big), -big))
        index[a + rank if a < 0 else a] = slice(b, e, st)
    return tuple(index)


def _slice(m: _Run, n: _Node, x, starts, ends, axes=None, steps=None):
    index = _slice_index(n, x.dim(), starts, ends, axes, steps)
    if any(s.step is not None and s.step < 0 for s in index):
        raise UnsupportedOperator(f"Slice node {n.name!r}: a negative step on a value computed at run time")
    return x[index]


def _fold_numpy(n: _Node, values: list) -> np.ndarray:
    """``Slice`` and ``ConstantOfShape`` on constants (numpy: negative steps included)."""
    if n.op == "ConstantOfShape":
        fill = n.attrs.get("value")
        from onnx import numpy_helper

        value = numpy_helper.to_array(fill).reshape(-1) if fill is not None else np.zeros(1, np.float32)
        return np.full([int(d) for d in np.atleast_1d(values[0])], value[0], value.dtype)
    x = np.asarray(values[0])
    return x[_slice_index(n, x.ndim, *values[1:])].copy()


def _unary(fn: Callable) -> Callable:
    return lambda m, n, x: fn(x, n.attrs)


_OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda m, n, x, y: torch.matmul(x, y),
    "BatchNormalization": _batch_norm,
    "Relu": _unary(lambda x, a: torch.relu(x)),
    "Clip": _clip,
    "Sigmoid": _unary(lambda x, a: torch.sigmoid(x)),
    "HardSigmoid": _unary(
        lambda x, a: torch.clamp(x * float(a.get("alpha", 0.2)) + float(a.get("beta", 0.5)), 0.0, 1.0)
    ),
    "HardSwish": _unary(lambda x, a: F.hardswish(x)),
    "LeakyRelu": _unary(lambda x, a: F.leaky_relu(x, float(a.get("alpha", 0.01)))),
    "Add": lambda m, n, x, y: x + y,
    "Sub": lambda m, n, x, y: x - y,
    "Mul": lambda m, n, x, y: x * y,
    "Div": _div,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _unary(lambda x, a: x.mean(dim=list(range(2, x.dim())), keepdim=True)),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": lambda m, n, *xs: torch.cat(list(xs), int(n.attrs["axis"])),
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Dropout": lambda m, n, x, *_: x,
    "Identity": lambda m, n, x: x,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Pad": _pad,
    "ReduceMean": _reduce_mean,
    "Gather": _gather,
    "Cast": _cast,
    "Slice": _slice,
}
_FOLD_ONLY = ("Constant", "Shape", "ConstantOfShape")  # supported where they fold to constants
SUPPORTED_OPS = tuple(sorted([*_OPS, *_FOLD_ONLY]))
# inputs read as Python values (axes, pads, shapes, clip bounds), never as tensors in the graph
_STATIC_INPUTS = {
    "Reshape": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Pad": (1, 2, 3),
    "ReduceMean": (1,),
    "Clip": (1, 2),
    "Slice": (1, 2, 3, 4),
}


# --------------------------------------------------------------------------------------------------
# The module


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNormalization`` over axis 1 of an input of any rank ≥ 2."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of rank 2 or more, got {x.dim()}")


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module (made by :func:`onnx_to_torch`); one input, one output."""

    def __init__(self, graph: _Graph):
        super().__init__()
        self.weights = nn.ParameterDict()
        self.norms = nn.ModuleDict()
        self.constants = nn.Module()
        self.opset = graph.opset
        self.input_name, self.output_name = graph.input, graph.output
        self.nodes = graph.nodes
        self.norm_keys: dict[str, str] = {}
        self.sources: dict[str, tuple[str, str]] = {}  # value name -> ("param" | "buffer", key)
        keys = _Keys()
        for name in graph.params:
            key = keys(name)
            self.weights[key] = nn.Parameter(torch.from_numpy(graph.arrays[name].copy()))
            self.sources[name] = ("param", key)
        for name in graph.buffers:
            key = keys(name)
            self.constants.register_buffer(key, torch.from_numpy(graph.arrays[name].copy()))
            self.sources[name] = ("buffer", key)
        self.static = dict(graph.static)  # shapes, axes, pads, bounds: read as Python values
        for node in self.nodes:
            if node.op == "BatchNormalization":
                key = keys(node.name or node.outputs[0])
                self.norm_keys[node.outputs[0]] = key
                self.norms[key] = _batch_norm_layer(node, graph.arrays)

    def _value(self, name: str, env: dict[str, torch.Tensor], static: bool):
        if not name:
            return None
        if static:
            return self.static[name]
        kind, key = self.sources.get(name, ("env", name))
        if kind == "param":
            return self.weights[key]
        if kind == "buffer":
            return getattr(self.constants, key)
        return env[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = _Run(self, {self.input_name: x})
        for node in self.nodes:
            static = _STATIC_INPUTS.get(node.op, ())
            args = [self._value(name, run.env, k in static) for k, name in enumerate(node.inputs)]
            run.env[node.outputs[0]] = _OPS[node.op](run, node, *args)
        return run.env[self.output_name]


class _Run:
    """One forward pass of an :class:`OnnxModule`: its layers and the values computed so far."""

    def __init__(self, module: OnnxModule, env: dict[str, torch.Tensor]):
        self.module, self.env, self.opset = module, env, module.opset

    def env_dim(self, dim: _Dim):
        return self.env[dim.value].shape[dim.axis]

    def batch_norm(self, output: str) -> nn.Module:
        return self.module.norms[self.module.norm_keys[output]]


def _batch_norm_layer(node: _Node, arrays: dict[str, np.ndarray]) -> _BatchNorm:
    scale, bias, mean, var = (arrays[i] for i in node.attrs["_stats"])
    layer = _BatchNorm(len(scale), eps=float(node.attrs.get("epsilon", 1e-5)))
    momentum = node.attrs.get("momentum")
    if momentum is not None:  # ONNX: running = running·momentum + batch·(1 − momentum)
        layer.momentum = 1.0 - float(momentum)
    with torch.no_grad():
        for target, value in ((layer.weight, scale), (layer.bias, bias)):
            target.copy_(torch.from_numpy(np.array(value)))
        layer.running_mean.copy_(torch.from_numpy(np.array(mean)))
        layer.running_var.copy_(torch.from_numpy(np.array(var)))
    return layer


class _Keys:
    """Unique attribute-safe keys for ONNX value names (``conv1.weight`` → ``conv1_weight``)."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def __call__(self, name: str) -> str:
        base = re.sub(r"\W", "_", name) or "value"
        base = f"v_{base}" if base[0].isdigit() else base
        key, k = base, 1
        while key in self.taken:
            key, k = f"{base}_{k}", k + 1
        self.taken.add(key)
        return key


# --------------------------------------------------------------------------------------------------
# Reading the graph


@dataclass
class _Graph:
    input: str
    output: str
    opset: int
    nodes: list[_Node]
    arrays: dict[str, np.ndarray]  # constants by value name (initializers, Constant nodes, folds)
    params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    static: dict[str, Any] = field(default_factory=dict)  # folded shapes and axes (Python values)


def onnx_to_torch(model: Any) -> OnnxModule:
    """A trainable torch module computing what the ONNX ``model`` (a ModelProto, its bytes or a
    ``.onnx`` path) computes, for one input and one output (the first of each).

    Raises :class:`UnsupportedOperator` naming the first node whose operator is not in
    :data:`SUPPORTED_OPS` (or whose form is not supported) before anything is built."""
    proto = _load(model)
    graph = _read_graph(proto)
    return OnnxModule(graph).eval()


def _load(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, Path)):
        return onnx.load(str(model))
    raise TypeError(f"expected an ONNX ModelProto, bytes or a path, got {type(model).__name__}")


def _unsupported(op: str, name: str) -> UnsupportedOperator:
    return UnsupportedOperator(
        f"the ONNX graph uses {op!r} (node {name!r}), which the surrogate importer does not support; "
        f"the surrogate starts from a fresh edge network instead"
    )


def _check_supported(g) -> None:
    """Raise :class:`UnsupportedOperator` for the first node the importer cannot run."""
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for node in g.node:
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            raise _unsupported(node.op_type, node.name)
        if any(o in read for o in node.output[1:]):  # MaxPool indices, a Dropout mask
            raise UnsupportedOperator(
                f"the ONNX graph reads a second output of {node.op_type!r} (node {node.name!r}), which the "
                f"surrogate importer does not support; the surrogate starts from a fresh edge network instead"
            )


def _read_graph(proto) -> _Graph:
    from onnx import helper, numpy_helper, shape_inference

    g = proto.graph
    _check_supported(g)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    arrays = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in arrays]
    if len(inputs) != 1 or len(g.output) < 1:
        raise UnsupportedOperator(f"the ONNX graph has {len(inputs)} inputs; the importer needs one")
    nodes = [
        _Node(
            n.op_type,
            n.name or f"{n.op_type}_{k}",
            list(n.input),
            list(n.output),
            {a.name: helper.get_attribute_value(a) for a in n.attribute},
        )
        for k, n in enumerate(g.node)
    ]
    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shapes are only needed for Shape nodes
        inferred = proto
    graph = _Graph(inputs[0], g.output[0].name, int(opset), nodes, arrays)
    _fold(graph, _value_shapes(inferred))
    _classify(graph)
    return graph


def _value_shapes(proto) -> dict[str, list[int | None]]:
    """Each value's inferred dimensions (None where the size is dynamic or unknown)."""
    g = proto.graph
    shapes = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in vi.type.tensor_type.shape.dim
            ]
    return shapes


@dataclass
class _FoldContext:
    """What an operator run at import time may ask of its module (the opset)."""

    opset: int


def _weight_names(graph: _Graph) -> set[str]:
    """Initializers in weight slots (see the module docstring): these never fold."""
    producers = {o for n in graph.nodes if n.op in _PRODUCERS for o in n.outputs}
    names = set()
    for n in graph.nodes:
        slots: Sequence[int] = _WEIGHT_OPS.get(n.op, ())
        if n.op in _AFFINE_OPS and any(i in producers for i in n.inputs):
            slots = range(len(n.inputs))
        if n.op == "BatchNormalization":
            slots = range(1, 5)
        names |= {
            n.inputs[s]
            for s in slots
            if s < len(n.inputs)
            and n.inputs[s] in graph.arrays
            and graph.arrays[n.inputs[s]].dtype.kind == "f"
        }
    return names


def _fold(graph: _Graph, shapes: dict[str, list[int | None]]) -> None:
    """Fold Constant nodes, Shape nodes and nodes whose inputs are all constants (not weights)."""
    from onnx import numpy_helper

    weights = _weight_names(graph)
    kept = []
    for n in graph.nodes:
        known = [i for i in n.inputs if i]
        if n.op == "Constant":
            graph.arrays[n.outputs[0]] = _constant_value(n, numpy_helper)
        elif n.op == "Shape":
            graph.static[n.outputs[0]] = _shape_value(n, graph, shapes)
        elif known and all(i not in weights and _is_const(graph, i) for i in known):
            _fold_node(graph, n)
        elif n.op in _FOLD_ONLY:
            raise _unsupported(n.op, n.name)
        else:
            kept.append(n)
    for name, value in list(graph.static.items()):
        if not _symbolic(value):  # fully static after all: an ordinary constant
            graph.arrays[name] = np.asarray(value, np.int64)
            del graph.static[name]
    graph.nodes = kept


def _is_const(graph: _Graph, name: str) -> bool:
    return name in graph.arrays or name in graph.static


def _symbolic(value: Any) -> bool:
    return isinstance(value, _Dim) or (isinstance(value, list) and any(isinstance(v, _Dim) for v in value))


def _constant_value(n: _Node, numpy_helper) -> np.ndarray:
    a = n.attrs
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(list(a[key]), dtype)
    raise _unsupported("Constant", n.name)


def _shape_value(n: _Node, graph: _Graph, shapes: dict) -> Any:
    src = n.inputs[0]
    if src in graph.arrays:
        dims: list[Any] = list(graph.arrays[src].shape)
    elif src in shapes:
        dims = [d if d is not None else _Dim(src, i) for i, d in enumerate(shapes[src])]
    else:
        raise UnsupportedOperator(
            f"the ONNX graph uses 'Shape' (node {n.name!r}) on a value of unknown rank, which the surrogate "
            f"importer does not support; the surrogate starts from a fresh edge network instead"
        )
    start, end = n.attrs.get("start", 0), n.attrs.get("end")
    return [int(d) if not isinstance(d, _Dim) else d for d in dims[start:end]]


def _fold_node(graph: _Graph, n: _Node) -> None:
    """Run ``n`` now on its constant inputs; the result becomes a constant."""
    values = [graph.static[i] if i in graph.static else graph.arrays.get(i) for i in n.inputs]
    if any(_symbolic(v) for v in values):
        graph.static[n.outputs[0]] = _fold_symbolic(n, values)
        return
    if n.op in ("Slice", "ConstantOfShape"):
        graph.arrays[n.outputs[0]] = _fold_numpy(n, values)
        return
    static_slots = _STATIC_INPUTS.get(n.op, ())
    args = [
        None
        if v is None
        else (np.asarray(v).tolist() if k in static_slots else torch.from_numpy(np.array(v)))
        for k, v in enumerate(values)
    ]
    with torch.no_grad():
        out = _OPS[n.op](_FoldContext(graph.opset), n, *args)
    graph.arrays[n.outputs[0]] = out.numpy()


def _fold_symbolic(n: _Node, values: list) -> Any:
    """A shape operator on a shape holding sizes known only at run time (the batch)."""
    if n.op not in _SHAPE_OPS:
        raise _unsupported(n.op, n.name)
    as_list = [
        v if isinstance(v, list) else np.asarray(v).tolist() if v is not None else None for v in values
    ]
    x = as_list[0]
    if n.op in ("Cast", "Identity"):
        return values[0]
    if n.op == "Concat":
        return [d for v in as_list for d in (v if isinstance(v, list) else [v])]
    if n.op == "Unsqueeze" and not isinstance(x, list):
        return [values[0]]
    if n.op == "Squeeze" and isinstance(x, list) and len(x) == 1:
        return x[0]
    if n.op == "Gather" and isinstance(x, list) and int(n.attrs.get("axis", 0)) == 0:
        idx = np.asarray(values[1])
        picked = [x[int(i)] for i in idx.reshape(-1)]
        return picked[0] if idx.ndim == 0 else picked
    raise _unsupported(n.op, n.name)


def _classify(graph: _Graph) -> None:
    """Sort the constants the remaining nodes read into weights, buffers and static values (read as
    Python values: shapes, axes, pads, bounds); sizes known only at run time may only shape a Reshape."""
    weights = _weight_names(graph)
    symbolic = set(graph.static)  # after _fold, only shapes holding run-time sizes are left here
    params, buffers = [], []
    for n in graph.nodes:
        if n.op == "BatchNormalization":
            n.attrs["_stats"] = n.inputs[1:5]
            n.inputs = n.inputs[:1]
            continue
        for k, name in enumerate(n.inputs):
            static = k in _STATIC_INPUTS.get(n.op, ())
            if name in symbolic and not (static and n.op == "Reshape"):
                raise _unsupported(n.op, n.name)
            if not name or name in symbolic:
                continue
            if static and name not in graph.arrays:
                raise UnsupportedOperator(
                    f"node {n.name!r} ({n.op}) computes input {k} in the graph; the importer needs a "
                    f"constant there"
                )
            if static:
                graph.static[name] = graph.arrays[name].tolist()
            elif name in graph.arrays:
                (params if name in weights else buffers).append(name)
    graph.params = list(dict.fromkeys(params))
    graph.buffers = [b for b in dict.fromkeys(buffers) if b not in graph.params]
