"""An ONNX classifier (``rrise build --model path.onnx``) imported into the canonical form: one NCHW
float image input in [0, 1], one float ``[B, K]`` output, the normalization as ``Sub``/``Div`` nodes
in front, unused outputs pruned, checked against the original graph on probe inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import sha256_file

from .canonical_model import (
    PROBE_BATCH,
    ModelOptions,
    UserModel,
    UserModelError,
    check_finite_probe,
    choose_output,
    detect_output_kind,
    gpu_message,
    probe_inputs,
    resolve_shape,
    run_fixed,
    session_or_error,
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
    source: dict[str, Any] = {"form": "onnx", "path": str(path.resolve()), "sha256": sha256_file(path)}
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
        source["external_data"][name] = sha256_file(f)
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:  # noqa: BLE001
        raise UserModelError(f"{what}: cannot read its external weights: {exc}") from None
    return proto, source


def _onnx_image_input(proto, what: str, opts: ModelOptions):
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
    c, h, w, channels = resolve_shape(what, c, h, w, opts, "its ONNX input shape")
    return inp, float_types[elem], batch, (c, h, w), channels


def from_onnx(path: Path, opts: ModelOptions) -> UserModel:
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
    session = session_or_error(original, what)
    nb = batch or PROBE_BATCH
    x = probe_inputs((c, h, w), nb)
    x_in = x
    if norm is not None:
        mean, std = (np.asarray(v, np.float32).reshape(1, c, 1, 1) for v in norm)
        x_in = (x - mean) / std
    try:
        outs = session.run(None, {inp.name: x_in.astype(in_dtype)})
    except Exception as exc:  # noqa: BLE001
        gpu = gpu_message(what, exc)
        raise UserModelError(gpu or f"{what} fails on a [{nb}, {c}, {h}, {w}] input: {exc}") from None
    names = [o.name for o in session.get_outputs()]
    chosen, notes = choose_output(names, outs, nb, opts.output, what)
    ref = np.asarray(outs[names.index(chosen)])
    k = int(ref.shape[1])
    check_finite_probe(ref.astype(np.float64), what)
    kind, more = detect_output_kind(ref.astype(np.float64), opts.output_kind, f"{what} output {chosen!r}")
    notes += more
    io = _Io(inp.name, in_dtype, chosen, (c, h, w), batch, norm)
    canonical, fixed_batch, more = _canonical_onnx(proto, io, ref, what)
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


@dataclass(frozen=True)
class _Io:
    """The source graph's image input (name, element type), its chosen output, the canonical
    ``(C, H, W)``, the batch size the graph declares (None: dynamic) and the normalization to wrap
    in (``(mean, std)`` or None)."""

    input_name: str
    in_dtype: Any
    output: str
    chw: tuple[int, int, int]
    batch: int | None
    norm: Any


def _canonical_onnx(proto, io: _Io, ref: np.ndarray, what: str):
    """The canonical ONNX bytes, its fixed batch (None if dynamic) and notes (``ref``: the source
    graph's outputs on the probe inputs).

    Canonical: one float32 NCHW input in [0, 1] (normalization and input casts inside), one float32
    [B, K] output, a dynamic batch axis where the model allows one, outputs equal to the original's.
    """
    input_name, output, chw, batch = io.input_name, io.output, io.chw, io.batch
    model = _rewrite_io(proto, input_name, io.in_dtype, output, chw[0], io.norm)
    probe = probe_inputs(chw, PROBE_BATCH)
    forms = [None] if batch is None else [None, batch]  # a static batch: try to free it first
    last_error = None
    for fixed in forms:
        _set_io(model.graph, input_name, output, chw, "batch" if fixed is None else fixed, int(ref.shape[1]))
        try:
            data = model.SerializeToString()
        except ValueError as exc:
            raise UserModelError(f"{what} is larger than 2 GB: {exc}") from None
        try:
            _check_canonical(session_or_error(data, what), probe, ref, fixed)
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
    k = min(len(ref), PROBE_BATCH)  # ref's first rows are the same images as probe's
    got = run_fixed(session, probe, fixed)
    if not np.allclose(got[:k], np.asarray(ref[:k], np.float32), rtol=1e-4, atol=1e-5):
        diff = float(np.max(np.abs(got[:k] - ref[:k])))
        raise ValueError(f"it differs from the original model (max |Δ| {diff:.3g})")
    if fixed is None:
        alone = np.concatenate([run_fixed(session, probe[i : i + 1], None) for i in range(len(probe))])
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
