"""The ONNX → torch importer: parity with onnxruntime, trainability, export back to ONNX, and the
named error for an operator it does not support."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rrise.calibrate.models import build_model
from rrise.calibrate.onnx_to_torch import UnsupportedOperator, onnx_to_torch
from rrise.calibrate.user_model import load_user_model
from rrise.export.onnx_export import export_onnx, onnx_logits

RTOL = 1e-4


class EveryGroup(nn.Module):
    """A classifier on 1×16×16 inputs using an operator of every supported group."""

    def __init__(self, k: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.proj = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.fc = nn.Linear(12 + 16, k)
        with torch.no_grad():  # non-trivial running statistics
            for bn in (self.bn, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.25) / 0.5
        x = self.bn(F.max_pool2d(F.relu(self.conv(x)), 3, 1, 1))  # not after a Conv: not fused
        y = F.hardswish(self.bn2(self.dw(x)))
        y = y * torch.sigmoid(y) + F.hardsigmoid(y) - F.leaky_relu(y, 0.1)
        y = F.relu6(self.pw(y))
        y = F.avg_pool2d(F.pad(y, (0, 1, 0, 1)), 2, 2, count_include_pad=True)
        z = F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
        g = torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)
        t = z.permute(0, 2, 3, 1).mean(dim=(1, 2), keepdim=True).squeeze(1).squeeze(1)
        m = torch.matmul(t, self.proj)
        h = torch.cat([m, g.view(g.size(0), -1)], 1).unsqueeze(2).squeeze(2)
        return torch.log_softmax(self.fc(nn.functional.dropout(h, 0.5, self.training)), 1)


def _export(module: nn.Module, shape, path) -> onnx.ModelProto:
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.rand(2, *shape),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            opset_version=17,
            dynamo=False,
        )
    return onnx.load(str(path))


def _digits(side: int, n: int = 64) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n].astype(np.float32) / 16.0
    rep = side // 8
    return np.kron(images, np.ones((rep, rep), np.float32))[:, None]


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _relative_error(module: nn.Module, proto: onnx.ModelProto, x: np.ndarray) -> float:
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(x)).numpy()
    ref = _ort(proto, x)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _inputs(shape, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((5, *shape), dtype=np.float32), _digits(shape[-1])[:, : shape[0]].repeat(shape[0], 1)]


def test_a_torch_model_with_every_operator_group_matches_onnxruntime(tmp_path) -> None:
    torch.manual_seed(0)
    proto = _export(EveryGroup(), (1, 16, 16), tmp_path / "every.onnx")
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid"} <= ops
    assert {"MaxPool", "AveragePool", "Pad", "GlobalAveragePool", "Transpose", "ReduceMean"} <= ops
    assert {"MatMul", "Gemm", "Concat", "LeakyRelu", "Sub", "Div", "Mul", "Add", "Flatten"} <= ops
    module = onnx_to_torch(proto)
    for x in _inputs((1, 16, 16)):
        assert _relative_error(module, proto, x) < RTOL


def _hand_graph() -> onnx.ModelProto:
    """Operator forms torch never exports: auto_pad, Gemm alpha/beta/transB, a Reshape with 0 and -1,
    a Constant/Shape/Gather chain, a MaxPool with SAME_UPPER."""
    rng = np.random.default_rng(1)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], auto_pad="SAME_UPPER", strides=[2, 2], name="c1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], auto_pad="VALID", name="c2"),
        helper.make_node(
            "MaxPool", ["c2"], ["p"], kernel_shape=[2, 2], auto_pad="SAME_UPPER", strides=[2, 2]
        ),
        helper.make_node(
            "Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64))
        ),
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["g"], alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Shape", ["g"], ["gs"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["gs", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "kk"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["g", "newshape"], ["y0"]),
        helper.make_node("Softmax", ["y0"], ["y"], axis=1),
    ]
    inits = [
        init("w1", 4, 1, 3, 3),
        init("b1", 4),
        init("w2", 6, 4, 2, 2),
        init("wg", 5, 6 * 4 * 4),
        init("bg", 5),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    inits += [numpy_helper.from_array(np.array([5], np.int64), "kk")]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


def test_hand_written_operator_forms_match_onnxruntime_and_fold_shape_chains() -> None:
    proto = _hand_graph()
    module = onnx_to_torch(proto)
    assert {n.op for n in module.nodes} == {"Conv", "MaxPool", "Reshape", "Gemm", "Softmax"}
    for x in _inputs((1, 16, 16)):
        assert _relative_error(module, proto, x) < RTOL


def test_the_canonical_onnx_of_a_user_model_matches_and_exports_back(tmp_path) -> None:
    base = build_model("cnn-small", 3, 10, 16, seed=0).eval()
    export_onnx(base, tmp_path / "base.onnx", (3, 16, 16))
    user = load_user_model(tmp_path / "base.onnx", mean=[0.4, 0.5, 0.6], std=0.25)
    canonical = onnx.load_from_string(user.onnx)
    assert [n.op_type for n in canonical.graph.node][:2] == ["Sub", "Div"]
    module = onnx_to_torch(user.onnx)
    norm = {name for name, _ in module.named_buffers() if "rrise" in name}
    assert len(norm) == 2, "the normalization is a buffer, not a weight"
    for x in _inputs((3, 16, 16)):
        assert _relative_error(module, canonical, x) < RTOL
    exported = export_onnx(module, tmp_path / "again.onnx", (3, 16, 16))
    x = _inputs((3, 16, 16))[0]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        onnx_logits(exported, np.concatenate([x, x])), np.concatenate([ref, ref]), atol=1e-5
    )


def test_the_every_group_import_exports_back_with_a_dynamic_batch(tmp_path) -> None:
    torch.manual_seed(0)
    proto = _export(EveryGroup(), (1, 16, 16), tmp_path / "every.onnx")
    module = onnx_to_torch(proto)
    exported = export_onnx(module, tmp_path / "again.onnx", (1, 16, 16))
    x = _inputs((1, 16, 16))[1][:7]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_logits(exported, x), ref, atol=1e-5)


def test_one_sgd_step_changes_the_weights() -> None:
    torch.manual_seed(0)
    proto = _hand_graph()
    module = onnx_to_torch(proto).train()
    params = dict(module.named_parameters())
    assert {"weights.w1", "weights.b1", "weights.w2", "weights.wg", "weights.bg"} <= set(params)
    before = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.from_numpy(_digits(16, 8))
    loss = F.nll_loss(torch.log(module(x)), torch.arange(8) % 5)
    loss.backward()
    opt.step()
    assert all(not torch.equal(before[k], v) for k, v in module.named_parameters())


def test_batch_norm_layers_keep_running_statistics_and_train_their_affine(tmp_path) -> None:
    torch.manual_seed(0)
    module = onnx_to_torch(_export(EveryGroup(), (1, 16, 16), tmp_path / "every.onnx"))
    names = dict(module.named_parameters())
    assert any(k.startswith("norms.") and k.endswith(".weight") for k in names)
    assert any(k.endswith("running_var") for k, _ in module.named_buffers())


def test_an_unsupported_operator_is_named_before_anything_is_built() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="first"),
        helper.make_node("Resize", ["r", "", "scales"], ["y"], name="xyz", mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    message = (
        "the ONNX graph uses 'Resize' (node 'xyz'), which the surrogate importer does not support; "
        "the surrogate starts from a fresh edge network instead"
    )
    with pytest.raises(UnsupportedOperator) as info:
        onnx_to_torch(proto)
    assert str(info.value) == message


def _older_graph(opset: int) -> onnx.ModelProto:
    """Clip bounds as attributes (before opset 11) or inputs, uneven Conv pads, Squeeze/Unsqueeze
    axes and ReduceMean axes as attributes, Softmax over the flattened trailing axes (before opset
    13), Dropout and Identity."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    if opset < 11:
        clip = helper.make_node("Clip", ["c"], ["r6"], min=0.0, max=6.0)
    else:
        clip = helper.make_node("Clip", ["c", "lo", "hi"], ["r6"])
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 0, 2, 1], strides=[1, 2]),
        clip,
        helper.make_node("Dropout", ["r6"], ["d"]),
        helper.make_node("Identity", ["d"], ["i"]),
        helper.make_node("ReduceMean", ["i"], ["m"], axes=[3], keepdims=0),
        helper.make_node("Unsqueeze", ["m"], ["u"], axes=[1]),
        helper.make_node("Squeeze", ["u"], ["s"], axes=[1]),
        helper.make_node("Softmax", ["s"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        f"opset{opset}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 17])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [10, 11])
def test_older_opset_attribute_forms_match_onnxruntime(opset: int) -> None:
    proto = _older_graph(opset)
    module = onnx_to_torch(proto)
    for x in _inputs((3, 16, 16)):
        assert _relative_error(module, proto, x) < RTOL


# --------------------------------------------------------------------------------------------------
# The surrogate of an ONNX base


def _resize_classifier(path) -> None:
    """A 3×16×16 → 4-class ONNX classifier with a Resize node (which the importer lacks)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="xyz", mode="nearest"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_an_onnx_base_starts_the_surrogate_from_its_weights_and_round_trips(tmp_path) -> None:
    from rrise.calibrate.model_files import load_surrogate, save_surrogate
    from rrise.calibrate.surrogates import build_surrogate, surrogate_spec

    base = build_model("cnn-small", 3, 10, 16, seed=0).eval()
    export_onnx(base, tmp_path / "base.onnx", (3, 16, 16))
    user = load_user_model(tmp_path / "base.onnx", mean=0.5, std=0.25)
    surrogate = build_surrogate(user)
    spec = surrogate_spec(surrogate)
    assert spec["arch"] == "base" and spec["onnx_start"] == "imported"
    assert surrogate.training and all(p.requires_grad for p in surrogate.parameters())
    x = _inputs((3, 16, 16))[1]
    assert _relative_error(surrogate, onnx.load_from_string(user.onnx), x) < RTOL
    save_surrogate(surrogate, tmp_path / "s.pt")
    for kwargs in ({}, {"base": user}):  # rebuilt from the recorded ONNX file, or from the base given
        again = load_surrogate(tmp_path / "s.pt", **kwargs)[0].eval()
        with torch.no_grad():
            torch.testing.assert_close(again(torch.from_numpy(x)), surrogate.eval()(torch.from_numpy(x)))


def test_an_onnx_base_with_an_unsupported_operator_gets_a_fresh_edge_network(tmp_path) -> None:
    from rrise.calibrate.surrogates import SurrogateError, build_surrogate, surrogate_spec

    _resize_classifier(tmp_path / "resize.onnx")
    user = load_user_model(tmp_path / "resize.onnx")
    spec = surrogate_spec(build_surrogate(user))
    assert spec["arch"] == "cnn-small" and spec["onnx_start"] == "fresh"
    assert "is ONNX and the ONNX graph uses 'Resize' (node 'xyz')" in spec["why"]
    with pytest.raises(SurrogateError, match="--surrogate-arch base: .*'Resize'"):
        build_surrogate(user, arch="base")


@pytest.mark.parametrize("which", ["every-group", "hand"])
def test_the_imported_module_goes_through_torch_export_with_a_dynamic_batch(which, tmp_path) -> None:
    torch.manual_seed(0)
    proto = (
        _export(EveryGroup(), (1, 16, 16), tmp_path / "every.onnx")
        if which == "every-group"
        else _hand_graph()
    )
    module = onnx_to_torch(proto)
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(module, (torch.rand(2, 1, 16, 16),), dynamic_shapes=({0: batch},))
    x = torch.from_numpy(_digits(16, 5))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), module(x))
