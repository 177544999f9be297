"""The user's own classifier in every form → one canonical model; Monte Carlo on each; bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rrise.calibrate import mc
from rrise.calibrate.user_model import UserModel, UserModelError, load_user_model
from tests.conftest import FASHION_AVAILABLE

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 12, 12)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, k=4):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 4, k)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))

    def build():
        torch.manual_seed(0)
        return Net().eval()

    instance = build()
    not_a_model = 3

    def broken():
        raise RuntimeError("no GPU, no model")
    """
)


def _net(k: int = 4, seed: int = 0) -> nn.Module:
    namespace: dict = {}
    exec(compile(NET_SOURCE, "usernet", "exec"), namespace)  # noqa: S102 - the same class as the file
    torch.manual_seed(seed)
    net = namespace["Net"](k)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _export(model: nn.Module, path: Path, batch: int | None = None, names=("image", "scores")) -> Path:
    sample = torch.zeros(batch or 1, *SHAPE)
    dynamic = None if batch else {names[0]: {0: "b"}, names[1]: {0: "b"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (sample,), str(path), dynamo=False, input_names=[names[0]], output_names=list(names[1:]),
            dynamic_axes=dynamic,
        )  # fmt: skip
    return path


def _x(n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("usermodel")
    (root / "usernet.py").write_text(NET_SOURCE)
    net = _net()
    torch.save(net.state_dict(), root / "w.pt")
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, root / "ckpt.pt")
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, root / "dp.pt")
    torch.save(_net(k=7).state_dict(), root / "w7.pt")
    torch.save(nn.Sequential(nn.Linear(2, 2)), root / "whole.pt")  # a pickled module, not a state dict
    _export(net, root / "static1.onnx", batch=1)
    _export(net, root / "dynamic.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(net, (torch.zeros(1, *SHAPE),)), str(root / "static.pt2"))
        dyn = torch.export.export(
            net, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("b")},)
        )
        torch.export.save(dyn, str(root / "dynamic.pt2"))
    return root, net


def _check_canonical(um: UserModel, net: nn.Module, norm: bool = False) -> None:
    x = _x()
    inp = torch.from_numpy(x)
    if norm:
        inp = (inp - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(inp).numpy()
    np.testing.assert_allclose(um.forward(x), want, rtol=1e-4, atol=1e-5)
    assert um.input_shape == SHAPE and um.num_classes == 4 and um.channels == "rgb"
    assert um.output_kind == "logits" and um.onnx is not None and len(um.onnx_sha256) == 64
    import onnxruntime as ort

    sess = ort.InferenceSession(um.onnx, providers=["CPUExecutionProvider"])
    (inp_spec,) = sess.get_inputs()
    assert inp_spec.type == "tensor(float)" and list(inp_spec.shape[1:]) == list(SHAPE)
    assert len(sess.get_outputs()) == 1
    np.testing.assert_allclose(sess.run(None, {inp_spec.name: x})[0], want, rtol=1e-4, atol=1e-5)


def test_onnx_forms(files) -> None:
    root, net = files
    um = load_user_model(root / "static1.onnx")
    _check_canonical(um, net)
    assert um.fixed_batch is None and any("batch axis is freed" in n for n in um.notes)
    assert um.source["form"] == "onnx" and len(um.source["sha256"]) == 64
    um = load_user_model(str(root / "dynamic.onnx"), mean=MEAN, std=STD)
    _check_canonical(um, net, norm=True)
    assert um.mean == MEAN and um.provenance()["std"] == list(STD)
    out = root / "canonical.onnx"
    um.save_onnx(out)
    assert load_user_model(out).onnx_sha256 != um.source["sha256"]  # a new, self-contained model
    np.testing.assert_allclose(load_user_model(out).forward(_x()), um.forward(_x()), rtol=1e-6)


def test_torch_forms(files, monkeypatch) -> None:
    root, net = files
    for spec, kw in [
        (root / "static.pt2", {}),
        (root / "dynamic.pt2", {}),
        (f"{root}/usernet.py:build", {"input_size": 12, "weights": root / "w.pt"}),
        (f"{root}/usernet.py:Net", {"input_size": (12, 12), "weights": root / "w.pt"}),
        (f"{root}/usernet.py:instance", {"input_size": 12, "weights": root / "ckpt.pt"}),
        (_net(seed=5), {"input_size": 12, "weights": root / "dp.pt"}),
    ]:
        um = load_user_model(spec, **kw)
        _check_canonical(um, net)
        assert um.module is not None and um.fixed_batch is None
        with torch.no_grad():
            np.testing.assert_allclose(
                um.module(torch.from_numpy(_x())).numpy(),
                net(torch.from_numpy(_x())).numpy(),
                rtol=1e-5,
                atol=1e-6,
            )
    bare = load_user_model(f"{root}/usernet.py:build", input_size=12)
    assert any("no --weights given" in n for n in bare.notes) and bare.source["weights"] is None
    monkeypatch.syspath_prepend(str(root))
    um = load_user_model("usernet:Net", weights=root / "w.pt", input_size=12, mean=MEAN, std=STD)
    _check_canonical(um, net, norm=True)
    assert um.source["factory"] == "usernet:Net" and len(um.source["weights_sha256"]) == 64
    assert um.source["factory_file_sha256"]
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(net.state_dict(), str(root / "w.safetensors"))
    _check_canonical(load_user_model("usernet:Net", weights=root / "w.safetensors", input_size=12), net)


def test_a_graph_fixed_to_its_batch_runs_in_fixed_chunks(tmp_path) -> None:
    class Rigid(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(int(np.prod(SHAPE)), 3)

        def forward(self, x):
            return self.fc(x.reshape(2, -1))  # hard-coded batch of 2

    torch.manual_seed(0)
    rigid = Rigid().eval()
    path = _export(rigid, tmp_path / "rigid.onnx", batch=2)
    um = load_user_model(path)
    assert um.fixed_batch == 2 and any("only runs batches of 2" in n for n in um.notes)
    x = _x(5)
    with torch.no_grad():
        want = torch.cat([rigid(torch.from_numpy(np.concatenate([x[i : i + 1]] * 2)))[:1] for i in range(5)])
    np.testing.assert_allclose(um.forward(x), want.numpy(), rtol=1e-5, atol=1e-6)
    counts = mc.sample_counts(um, x, 101, 0.25, batch_size=7, seed=3)
    assert counts.shape == (5, 3) and (counts.sum(1) == 101).all()
    np.testing.assert_array_equal(counts, mc.sample_counts(um, x, 101, 0.25, batch_size=64, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(rigid, (torch.zeros(2, *SHAPE),)), str(tmp_path / "rigid.pt2"))
    um2 = load_user_model(tmp_path / "rigid.pt2")
    assert um2.fixed_batch == 2 and any("only runs batches of 2" in n for n in um2.notes)
    np.testing.assert_allclose(um2.forward(x), want.numpy(), rtol=1e-5, atol=1e-6)


def test_monte_carlo_runs_on_every_form_with_the_same_seeding(files) -> None:
    root, net = files
    x = _x(4)
    ref = mc.sample_counts(str(root / "dynamic.onnx"), x, 300, 0.3, batch_size=128, seed=7)
    forms = [
        load_user_model(root / "static1.onnx"),
        load_user_model(root / "dynamic.pt2"),
        load_user_model(f"{root}/usernet.py:Net", weights=root / "w.pt", input_size=12),
        load_user_model(_net(), input_size=12),
    ]
    for um in forms:
        counts = mc.sample_counts(um, x, 300, 0.3, batch_size=128, seed=7)
        np.testing.assert_array_equal(counts, ref)  # the same noise, the same model: the same votes
        pieces = [
            mc.sample_counts(um, x[i], 300, 0.3, batch_size=50, seed=7, index_offset=i) for i in range(4)
        ]
        np.testing.assert_array_equal(np.stack(pieces), ref)
        assert mc.prepare_model(um).backend == "onnxruntime"
    assert mc.prepare_model(forms[-1], "torch").target is forms[-1].module
    res = mc.certify(forms[0], x, 20, 200, 0.3, 0.01, seed=1)
    assert len(res) == 4
    with pytest.raises(ValueError, match="needs a torch model"):
        mc.prepare_model(forms[0], "torch")


def test_output_choice_kind_and_class_checks(tmp_path) -> None:
    net = _net()

    class Two(nn.Module):
        def __init__(self, both_float: bool):
            super().__init__()
            self.net, self.both = net, both_float

        def forward(self, x):
            y = self.net(x)
            return (y if self.both else y.argmax(1)), torch.softmax(y, 1)

    _export(Two(False), tmp_path / "label_probs.onnx", names=("x", "label", "probs"))
    um = load_user_model(tmp_path / "label_probs.onnx")
    assert um.output_name == "probs" and um.output_kind == "probs"
    assert any("only float [B, K] one" in n for n in um.notes) and any("sum to 1" in n for n in um.notes)
    with pytest.raises(UserModelError, match="--output-kind logits, but .* sum to 1"):
        load_user_model(tmp_path / "label_probs.onnx", output_kind="logits")
    _export(Two(True), tmp_path / "two.onnx", names=("x", "logits", "probs"))
    with pytest.raises(UserModelError, match=r"several float \[B, K\] outputs .*candidates: logits, probs"):
        load_user_model(tmp_path / "two.onnx")
    with pytest.raises(UserModelError, match="no such output"):
        load_user_model(tmp_path / "two.onnx", output="nope")
    um = load_user_model(tmp_path / "two.onnx", output="logits")
    assert um.output_name == "logits" and um.output_kind == "logits"
    with pytest.raises(UserModelError, match="--output-kind probs, but"):
        load_user_model(tmp_path / "two.onnx", output="logits", output_kind="probs")
    tm = load_user_model(Two(True), input_size=12, output="0")
    assert tm.output_kind == "logits" and tm.module(torch.zeros(2, *SHAPE)).shape == (2, 4)
    um.check_classes(4)
    with pytest.raises(UserModelError, match="outputs 4 classes but DATA folder has 3 .a, b, c."):
        um.check_classes(3, ["a", "b", "c"], data="DATA folder")


def test_bad_models_are_refused_by_name(files, tmp_path) -> None:
    root, _ = files
    cases = [
        ("nosuchpkg.mod:build", {}, "cannot import nosuchpkg.mod"),
        (f"{root}/usernet.py:nothing", {}, "has no attribute 'nothing'"),
        (f"{root}/usernet.py:not_a_model", {}, "not an nn.Module"),
        (f"{root}/usernet.py:broken", {}, r"calling broken\(\) raised RuntimeError: no GPU, no model"),
        (f"{root}/usernet.py:Net", {}, "pass --input-size"),
        (
            f"{root}/usernet.py:Net",
            {"input_size": 12, "weights": root / "w7.pt"},
            "key 'fc.weight' has shape",
        ),
        (f"{root}/usernet.py:Net", {"input_size": 12, "weights": root / "whole.pt"}, "weights_only=True"),
        (f"{root}/usernet.py:Net", {"input_size": 12, "weights": root / "nope.pt"}, "does not exist"),
        (root / "w.pt", {}, "is a weights file"),
        (root / "missing.onnx", {}, "does not exist"),
        ("justaword", {}, "neither a model file"),
        (root / "dynamic.onnx", {"channels": "gray"}, "--channels gray gives 1 channel"),
        (root / "dynamic.onnx", {"input_size": 32}, "--input-size 32 32 disagrees"),
        (root / "dynamic.onnx", {"weights": root / "w.pt"}, "--weights applies to"),
        (root / "dynamic.onnx", {"mean": 0.5}, "--mean and --std go together"),
        (root / "dynamic.onnx", {"mean": 120, "std": 60}, "0–255 pixel units"),
        (root / "dynamic.onnx", {"mean": (0.1, 0.2), "std": 0.2}, "--mean needs 1 or 3 values"),
        (root / "dynamic.onnx", {"output_kind": "scores"}, "--output-kind must be one of"),
    ]
    for spec, kw, match in cases:
        with pytest.raises(UserModelError, match=match):
            load_user_model(spec, **kw)
    sd = _net().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(UserModelError, match="the file has key 'extra.weight'"):
        load_user_model(f"{root}/usernet.py:Net", input_size=12, weights=tmp_path / "extra.pt")
    del sd["extra.weight"], sd["fc.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(UserModelError, match="key 'fc.bias' is missing from the file"):
        load_user_model(f"{root}/usernet.py:Net", input_size=12, weights=tmp_path / "missing.pt")

    class Nan(nn.Module):
        def forward(self, x):
            return torch.log(x.mean((2, 3)) - 0.5)  # NaN on the all-zero probe

    with pytest.raises(UserModelError, match="NaN or inf on probe input index 0"):
        load_user_model(Nan(), input_size=8)

    class NotBK(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))[:, :, None]

    with pytest.raises(UserModelError, match=r"must be float \[B, K\]"):
        load_user_model(NotBK(), input_size=8)
    (tmp_path / "int8.onnx").write_bytes(_int_input_onnx())
    with pytest.raises(UserModelError, match="INT8; the SDK feeds float pixels"):
        load_user_model(tmp_path / "int8.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserModelError, match="not a readable ONNX model"):
        load_user_model(tmp_path / "junk.onnx")


def _int_input_onnx() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.INT8, ["b", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    nodes = [
        helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["y"], axes=[2, 3], keepdims=0),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_that_needs_a_gpu_provider_is_refused_clearly(tmp_path) -> None:
    """NhwcConv (com.microsoft) has only a CUDA kernel: on a CPU-only onnxruntime it cannot load."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    w = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("NhwcConv", ["x", "w"], ["t"], domain="com.microsoft"),
        helper.make_node("ReduceMean", ["t"], ["y"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    ops = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 8
    (tmp_path / "gpu.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(UserModelError, match=r"gpu\.onnx needs a GPU execution provider .* absent here"):
        load_user_model(tmp_path / "gpu.onnx")


def test_nan_outputs_name_the_input_index() -> None:
    class NanOnDark(nn.Module):
        def forward(self, x):
            m = x.mean((1, 2, 3))
            out = torch.stack([m, 1 - m], 1)
            return torch.where(m[:, None] < 0.2, torch.full_like(out, float("nan")), out)

    model = NanOnDark()  # finite on the probe's bright images, NaN on dark inputs
    x = np.full((4, 1, 4, 4), 0.6, np.float32)
    x[2] = 0.05
    with pytest.raises(ValueError, match="NaN or inf on .* input index 12"):
        mc.sample_counts(model, x, 50, 0.01, seed=0, index_offset=10, backend="torch")
    with pytest.raises(ValueError, match="input index 2"):
        mc.sample_counts(model, x, 50, 0.01, seed=0, backend="onnxruntime")
    fine = _net()
    um = load_user_model(fine, input_size=12)
    assert um.predict(_x(3)).shape == (3,)


@pytest.mark.integration
@pytest.mark.skipif(not FASHION_AVAILABLE, reason="needs Fashion-MNIST (dataset-fashion-mnist)")
def test_example_script_trains_and_exports_a_model_the_sdk_takes(tmp_path) -> None:
    """examples/train_own_classifier.py (plain PyTorch, no rrise) on 3-channel 32×32 Fashion-MNIST PNGs;
    its ONNX, .pt2 and factory+state-dict forms load as one model and score the same."""
    import cv2

    from rrise.calibrate.user_data import load_images
    from rrise.datasets import load_dataset
    from rrise.runtime.preprocess import preprocess_spec

    ds = load_dataset("fashion-mnist", "test")
    root = tmp_path / "images"
    for c, name in enumerate(ds.classes):
        folder = root / name.replace("/", "-")
        folder.mkdir(parents=True)
        for i in np.flatnonzero(ds.labels == c)[:6]:
            g = cv2.resize(
                (ds.images[i, 0] * 255).round().astype(np.uint8), (32, 32), interpolation=cv2.INTER_LINEAR
            )
            cv2.imwrite(str(folder / f"{i}.png"), np.stack([g] * 3, axis=-1))
    out = tmp_path / "model"
    script = ROOT / "examples" / "train_own_classifier.py"
    run = subprocess.run(
        [sys.executable, str(script), "--data", str(root), "--out", str(out), "--epochs", "1",
         "--batch-size", "32", "--pt2", "--state-dict"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rrise" not in script.read_text().split('"""')[2].replace("rrise build", "")  # no rrise import
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    models = [
        load_user_model(out / "model.onnx", **norm),
        load_user_model(out / "model.pt2", **norm),
        load_user_model(f"{script}:build_model", weights=out / "model_state.pt", input_size=32, **norm),
    ]
    data = load_images(root, preprocess_spec(models[0].channels, models[0].input_shape[1:]))
    models[0].check_classes(data.num_classes, data.classes)
    x = np.asarray(data.images)
    ref = models[0].forward(x)
    for um in models:
        assert um.input_shape == (3, 32, 32) and um.num_classes == 10 and um.channels == "rgb"
        np.testing.assert_allclose(um.forward(x), ref, rtol=1e-3, atol=1e-4)
    counts = mc.sample_counts(models[0], x[:3], 100, 0.25, seed=0)
    np.testing.assert_array_equal(counts, mc.sample_counts(models[2], x[:3], 100, 0.25, seed=0))
