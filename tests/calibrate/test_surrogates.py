"""The surrogate for any base (rrise.calibrate.surrogates): built-in edge networks per input size,
copies of the base, the user's factories, save/load round trips and ONNX export."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rrise.calibrate.model_files import load_model, load_surrogate, save_surrogate
from rrise.calibrate.models import build_model
from rrise.calibrate.surrogates import (
    EdgeResNet,
    ProbsToLogits,
    SurrogateError,
    build_surrogate,
    model_cost,
    surrogate_spec,
)
from rrise.calibrate.user_model import load_user_model
from rrise.export.onnx_export import export_onnx, onnx_parity

K = 5

FACTORIES = """
import torch
from torch import nn

def small(input_shape, num_classes):
    c = input_shape[0]
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))

def zero():
    return small((3, 8, 8), 5)

class Net(nn.Module):
    def __init__(self, input_shape=(3, 12, 12), num_classes=5):
        super().__init__()
        self.body = small(input_shape, num_classes)
    def forward(self, x):
        return self.body(x)

instance = small((3, 8, 8), 5)

def wrong_classes(input_shape, num_classes):
    return small(input_shape, num_classes + 1)

def tuple_out(input_shape, num_classes):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small(input_shape, num_classes)
        def forward(self, x):
            return self.net(x), x
    return Two()

def not_a_module(input_shape, num_classes):
    return 42

def raises(input_shape, num_classes):
    raise RuntimeError("out of ideas")

def three(a, b, c):
    return small((3, 8, 8), 5)

def probs():
    return nn.Sequential(small((3, 12, 12), 5), nn.Softmax(dim=1))

not_callable = 7
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """A module of factories importable as ``rrise_surrogate_factories`` (and as a .py path)."""
    root = tmp_path_factory.mktemp("factories")
    (root / "rrise_surrogate_factories.py").write_text(FACTORIES)
    (root / "rrise_surrogate_broken.py").write_text("raise ImportError('needs a GPU library')\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in ("rrise_surrogate_factories", "rrise_surrogate_broken"):
        sys.modules.pop(name, None)


def _x(shape, n=3, seed=1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, *shape), dtype=np.float32))


def _train_step(model: nn.Module, shape) -> None:
    """One soft-label cross-entropy step (what train_surrogate does), in train mode."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logits = model(_x(shape, n=4, seed=7))
    target = torch.full_like(logits, 1.0 / logits.shape[1])
    loss = -(target * torch.log_softmax(logits, 1)).sum(1).mean() + logits.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()


def _same_outputs(a: nn.Module, b: nn.Module, shape, atol=1e-6) -> None:
    x = _x(shape)
    with torch.no_grad():
        np.testing.assert_allclose(a.eval()(x).numpy(), b.eval()(x).numpy(), rtol=1e-5, atol=atol)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------
# Built-in edge networks


@pytest.mark.parametrize(
    "shape, arch",
    [
        ((1, 8, 8), "cnn-small"),
        ((3, 8, 8), "cnn-small"),
        ((1, 28, 28), "cnn-small"),
        ((3, 28, 28), "cnn-small"),
        ((1, 32, 32), "edge-resnet"),
        ((3, 32, 32), "edge-resnet"),
        ((1, 64, 64), "edge-resnet"),
        ((3, 64, 64), "edge-resnet"),
        ((1, 224, 224), "edge-resnet"),
        ((3, 224, 224), "edge-resnet"),
        ((3, 20, 30), "edge-resnet"),  # not square: the residual net (any H×W)
    ],
)
def test_edge_arch_per_input_size_outputs_logits_exports_and_round_trips(shape, arch, tmp_path) -> None:
    model = build_surrogate(None, shape, K, arch="edge", mean=0.4, std=0.2, seed=3)
    spec = surrogate_spec(model)
    assert spec["arch"] == arch and spec["input_shape"] == list(shape) and spec["num_classes"] == K
    assert model.training
    assert isinstance(model[0] if arch == "cnn-small" else model.normalize, nn.Module)
    _train_step(model, shape)  # BatchNorm running statistics move: the export must fold them
    with torch.no_grad():
        assert model(_x(shape, n=2)).shape == (2, K)
    onnx_path = export_onnx(model, tmp_path / "s.onnx", shape)
    assert onnx_parity(model, onnx_path, _x(shape).numpy()) < 1e-4
    save_surrogate(model, tmp_path / "s.pt", sigma=0.25, labels=[str(i) for i in range(K)])
    again, meta = load_model(tmp_path / "s.pt")
    assert meta["arch"] == arch and meta["input_shape"] == list(shape) and meta["sigma"] == 0.25
    assert meta["surrogate"]["why"] == spec["why"]
    assert _state_equal(again, model)
    _same_outputs(again, model, shape, atol=0)


def test_edge_resnet_stays_small_at_224_px() -> None:
    for c in (1, 3):
        for k in (10, 1000):
            model = build_surrogate(None, (c, 224, 224), k, arch="edge")
            cost = model_cost(model, (c, 224, 224))
            assert cost["params"] < 2_000_000, cost
            assert cost["macs"] < 300e6, cost  # ResNet-18: 1.8 G; MobileNetV2: 0.3 G
    at_32 = model_cost(build_surrogate(None, (3, 32, 32), 10, arch="edge"), (3, 32, 32))
    assert at_32["macs"] < 100e6
    # The small CNN for small inputs is a few hundred thousand parameters at most.
    assert model_cost(build_surrogate(None, (1, 28, 28), 10, arch="edge"), (1, 28, 28))["params"] < 300_000
    layout = surrogate_spec(build_surrogate(None, (3, 224, 224), 10, arch="edge"))["layout"]
    assert layout["stem_stride"] == 2 and layout["stem_pools"] == 1 and len(layout["widths"]) == 4


def test_seeded_initial_weights_leave_torch_rng_alone() -> None:
    state = torch.get_rng_state()
    for arch, shape in [("edge-resnet", (3, 32, 32)), ("cnn-small", (1, 8, 8)), ("cnn", (1, 8, 8))]:
        a = build_surrogate(None, shape, K, arch=arch, seed=11)
        b = build_surrogate(None, shape, K, arch=arch, seed=11)
        c = build_surrogate(None, shape, K, arch=arch, seed=12)
        assert _state_equal(a, b) and not _state_equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_explicit_builtins_and_bad_arguments() -> None:
    assert isinstance(build_surrogate(None, (3, 16, 16), K, arch="edge-resnet"), EdgeResNet)
    big = build_surrogate(None, (1, 8, 8), K, arch="cnn")
    assert surrogate_spec(big)["arch"] == "cnn"
    with pytest.raises(SurrogateError, match="square"):
        build_surrogate(None, (3, 20, 30), K, arch="cnn-small")
    with pytest.raises(SurrogateError, match="unknown.*package.module:function"):
        build_surrogate(None, (3, 32, 32), K, arch="resnet50")
    with pytest.raises(SurrogateError, match="no base model"):
        build_surrogate(None, (3, 32, 32), K, arch="base")
    with pytest.raises(SurrogateError, match="input_shape"):
        build_surrogate(None, (32, 32), K)
    with pytest.raises(SurrogateError, match="num_classes"):
        build_surrogate(None, (3, 32, 32), None)
    with pytest.raises(SurrogateError, match="mean and std"):
        build_surrogate(None, (3, 32, 32), K, mean=0.5)
    with pytest.raises(SurrogateError, match="mean must be 1 or 3"):
        build_surrogate(None, (3, 32, 32), K, mean=[0.1, 0.2], std=0.5)
    with pytest.raises(SurrogateError, match="std must be positive"):
        build_surrogate(None, (3, 32, 32), K, mean=0.5, std=0.0)
    with pytest.raises(SurrogateError, match=r"num_classes not given.*\[B, K\]"):
        build_surrogate(nn.Identity(), (3, 32, 32), arch="edge")  # K comes from a [B, K] probe output

    # auto without a base: a built-in sized to the input, saying why
    auto = build_surrogate(None, (3, 64, 64), K)
    assert surrogate_spec(auto)["arch"] == "edge-resnet" and "no base model" in surrogate_spec(auto)["why"]
    with pytest.raises(ValueError, match="not made by build_surrogate"):
        surrogate_spec(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# Copies of the base


def test_base_copy_of_the_sdk_cnn_trains_without_touching_the_base(tmp_path) -> None:
    shape = (1, 8, 8)
    base = build_model("cnn-small", 1, K, 8, mean=0.3, std=0.3, seed=1).eval()
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    for given in (base, load_user_model(base, input_size=8)):
        surrogate = build_surrogate(given, shape, K)  # auto → base
        spec = surrogate_spec(surrogate)
        assert spec["arch"] == "base" and spec["base_arch"] == "cnn-small"
        assert spec["mean"] == pytest.approx([0.3]) and "weights" in spec["why"]
        assert _state_equal(surrogate, base)
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(surrogate.parameters(), base.parameters()))
        _train_step(surrogate, shape)
        assert not _state_equal(surrogate, base)
        assert all(torch.equal(base.state_dict()[k], v) for k, v in snapshot.items())
        save_surrogate(surrogate, tmp_path / "s.pt")
        again, meta = load_model(tmp_path / "s.pt")
        assert meta["arch"] == "cnn-small" and meta["surrogate"]["arch"] == "base"
        _same_outputs(again, surrogate, shape, atol=0)
        assert (
            onnx_parity(surrogate, export_onnx(surrogate, tmp_path / "s.onnx", shape), _x(shape).numpy())
            < 1e-4
        )


def test_base_copies_of_factory_and_pt2_models_round_trip_by_reloading_the_model(factories, tmp_path) -> None:
    shape = (3, 12, 12)
    net = load_user_model("rrise_surrogate_factories:Net", input_size=12).module  # the factory's own weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (torch.zeros(1, *shape),))
        torch.export.save(program, str(tmp_path / "net.pt2"))
    for model, kw in [
        (
            "rrise_surrogate_factories:Net",
            {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25], "input_size": 12},
        ),
        (f"{factories}/rrise_surrogate_factories.py:Net", {"input_size": 12}),
        (str(tmp_path / "net.pt2"), {}),
    ]:
        user = load_user_model(model, **kw)
        surrogate = build_surrogate(user, arch="base")
        spec = surrogate_spec(surrogate)
        assert spec["arch"] == "base" and spec["base"]["form"] in ("factory", "pt2")
        _train_step(surrogate, shape)
        save_surrogate(surrogate, tmp_path / "s.pt")
        again, meta = load_surrogate(tmp_path / "s.pt", trust_code=True)
        assert meta["surrogate"]["base"]["model"]
        _same_outputs(again, surrogate, shape)
        onnx_path = export_onnx(surrogate, tmp_path / "s.onnx", shape)
        assert onnx_parity(surrogate, onnx_path, _x(shape).numpy()) < 1e-4
    # A changed .pt2 is refused by name rather than silently rebuilt differently.
    (tmp_path / "net.pt2").write_bytes((tmp_path / "net.pt2").read_bytes() + b"\0")
    with pytest.raises(SurrogateError, match="has changed"):
        load_surrogate(tmp_path / "s.pt", trust_code=True)


def test_base_copy_of_a_python_module_loads_with_that_module(tmp_path) -> None:
    shape = (3, 12, 12)
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, K),
    ).eval()  # fmt: skip
    surrogate = build_surrogate(base, shape, mean=0.5, std=0.25)  # K from the probe; Normalize in front
    spec = surrogate_spec(surrogate)
    assert spec["arch"] == "base" and spec["normalize"] and spec["num_classes"] == K
    assert "base_arch" not in spec
    _train_step(surrogate, shape)
    save_surrogate(surrogate, tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"load_surrogate\(path, base="):
        load_model(tmp_path / "s.pt")
    again, _ = load_surrogate(tmp_path / "s.pt", base=base)
    _same_outputs(again, surrogate, shape, atol=0)
    assert surrogate_spec(again) == spec
    with pytest.raises(SurrogateError, match="does not fit.*key"):
        load_surrogate(tmp_path / "s.pt", base=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


def test_a_base_that_outputs_probabilities_gets_a_log_layer(factories, tmp_path) -> None:
    user = load_user_model("rrise_surrogate_factories:probs", input_size=12)
    assert user.output_kind == "probs"
    surrogate = build_surrogate(user)
    assert isinstance(surrogate[-1], ProbsToLogits) and surrogate_spec(surrogate)["probs_to_logits"]
    x = _x(user.input_shape)
    with torch.no_grad():
        np.testing.assert_allclose(
            torch.softmax(surrogate.eval()(x), 1).numpy(), user.module(x).numpy(), rtol=1e-5, atol=1e-6
        )
    save_surrogate(surrogate, tmp_path / "s.pt")
    _same_outputs(load_surrogate(tmp_path / "s.pt", trust_code=True)[0], surrogate, user.input_shape)


def test_an_onnx_base_is_imported_as_the_surrogates_start(tmp_path) -> None:
    base = build_model("cnn-small", 3, K, 32, seed=0).eval()
    export_onnx(base, tmp_path / "base.onnx", (3, 32, 32))
    user = load_user_model(tmp_path / "base.onnx", mean=0.5, std=0.25)
    auto = build_surrogate(user)
    spec = surrogate_spec(auto)
    assert spec["arch"] == "base" and spec["onnx_start"] == "imported"
    assert "imported from its ONNX graph" in spec["why"]
    assert spec["mean"] == [0.5] * 3 and spec["std"] == [0.25] * 3  # the base's normalization
    with pytest.raises(SurrogateError, match="differs"):
        build_surrogate(user, (3, 28, 28))
    assert surrogate_spec(build_surrogate(user, arch="cnn-small"))["arch"] == "cnn-small"


def test_a_base_that_does_not_give_b_by_k_is_not_copied() -> None:
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, K)

        def forward(self, x):
            return self.lin(x.mean((2, 3))), x

    auto = build_surrogate(Odd(), (3, 32, 32), K)
    assert surrogate_spec(auto)["arch"] == "edge-resnet" and "not [B, 5]" in surrogate_spec(auto)["why"]
    with pytest.raises(SurrogateError, match="--surrogate-arch base: the base model's output"):
        build_surrogate(Odd(), (3, 32, 32), K, arch="base")


# --------------------------------------------------------------------------------------------------
# The user's factory


def test_user_factories_build_seeded_and_round_trip_by_their_string(factories, tmp_path) -> None:
    shape = (3, 8, 8)
    for text, call in [
        ("rrise_surrogate_factories:small", "shape"),
        (f"{factories}/rrise_surrogate_factories.py:small", "shape"),
        ("rrise_surrogate_factories:zero", "none"),
        ("rrise_surrogate_factories:Net", "shape"),
        ("rrise_surrogate_factories:instance", "instance"),
    ]:
        model = build_surrogate(None, shape, K, arch=text, mean=0.5, std=0.25, seed=4)
        spec = surrogate_spec(model)
        assert spec["arch"] == "factory" and spec["call"] == call and spec["normalize"]
        assert spec["file_sha256"] and spec["factory"].endswith(text.rsplit(":", 1)[1])
        if call != "instance":
            assert _state_equal(model, build_surrogate(None, shape, K, arch=text, mean=0.5, std=0.25, seed=4))
        _train_step(model, shape)
        save_surrogate(model, tmp_path / "s.pt", sigma=0.5)
        with pytest.raises(SurrogateError, match="never imports code on its own"):
            load_model(tmp_path / "s.pt")  # a model file a user can hand the SDK imports nothing
        again, meta = load_surrogate(tmp_path / "s.pt", trust_code=True)
        assert meta["arch"] == "factory" and meta["sigma"] == 0.5
        _same_outputs(again, model, shape, atol=0)
        onnx_path = export_onnx(model, tmp_path / "s.onnx", shape)
        assert onnx_parity(model, onnx_path, _x(shape).numpy()) < 1e-4
    plain = build_surrogate(None, (1, 8, 8), K, arch="rrise_surrogate_factories:small")
    assert not surrogate_spec(plain)["normalize"] and isinstance(plain[0], nn.Conv2d)


@pytest.mark.parametrize(
    "text, message",
    [
        ("no_such_package_xyz.models:net", "cannot import no_such_package_xyz.models"),
        ("rrise_surrogate_broken:net", "importing rrise_surrogate_broken raised ImportError: needs a GPU"),
        ("rrise_surrogate_factories:missing", "has no attribute 'missing'"),
        ("rrise_surrogate_factories:not_callable", "is a int; expected an nn.Module or a function"),
        ("rrise_surrogate_factories:three", "expected an nn.Module or a function taking"),
        ("rrise_surrogate_factories:not_a_module", "returned a int, not a torch nn.Module"),
        ("rrise_surrogate_factories:raises", r"calling it with \(\(3, 8, 8\), 5\) raised RuntimeError"),
        ("rrise_surrogate_factories:wrong_classes", r"output is a tensor of shape \[2, 6\].*\[B, 5\]"),
        ("rrise_surrogate_factories:tuple_out", r"output is a tuple.*logits \[B, 5\]"),
        ("/no/such/dir/net.py:build", "does not exist"),
    ],
)
def test_factory_errors_are_clear(factories, text, message) -> None:
    with pytest.raises(SurrogateError, match=message) as info:
        build_surrogate(None, (3, 8, 8), K, arch=text)
    assert str(info.value).startswith(f"--surrogate-arch {text}")
    assert isinstance(info.value, ValueError)


def test_a_factory_that_changed_is_refused_by_key(factories, tmp_path) -> None:
    file = tmp_path / "changing.py"
    file.write_text(FACTORIES)
    model = build_surrogate(None, (3, 8, 8), K, arch=f"{file}:small")
    save_surrogate(model, tmp_path / "s.pt")
    file.write_text(FACTORIES.replace("nn.Conv2d(c, 4, 3", "nn.Conv2d(c, 6, 3"))
    with pytest.raises(SurrogateError, match=r"key '0.weight' has shape \[4, 3, 3, 3\] in the file"):
        load_surrogate(tmp_path / "s.pt", trust_code=True)
    with pytest.raises(SurrogateError, match="never imports code on its own"):  # load_model runs no code
        load_model(tmp_path / "s.pt")


def test_save_surrogate_needs_a_built_surrogate_and_owns_its_keys(tmp_path) -> None:
    model = build_surrogate(None, (1, 8, 8), K, arch="edge")
    with pytest.raises(TypeError, match="surrogate"):
        save_surrogate(model, tmp_path / "s.pt", surrogate={})
    with pytest.raises(ValueError, match="not made by build_surrogate"):
        save_surrogate(build_model("cnn-small", 1, K, 8), tmp_path / "s.pt")


def test_train_surrogate_fits_an_edge_resnet(tmp_path) -> None:
    """The SDK's training loop runs on the residual network (BatchNorm in train mode, a final
    batch of one) and its best-epoch weights survive a save/load."""
    from rrise.calibrate.train import train_surrogate

    rng = np.random.default_rng(0)
    images = rng.random((17, 3, 16, 16), dtype=np.float32)
    counts = rng.multinomial(50, [0.6, 0.1, 0.1, 0.1, 0.1], size=17).astype(np.int64)
    model = build_surrogate(None, (3, 16, 16), K, arch="edge-resnet")
    model, history = train_surrogate(
        model, images, counts, epochs=2, batch_size=8, val_images=images[:4], val_counts=counts[:4],
        show_progress=False, checkpoint=tmp_path / "s.ckpt",
    )  # fmt: skip
    assert len(history["train_kl"]) == 2 and not model.training
    save_surrogate(model, tmp_path / "s.pt", history=history)
    _same_outputs(load_model(tmp_path / "s.pt")[0], model, (3, 16, 16), atol=0)


class _Payload:
    """Pickled as a global reference: what a crafted checkpoint carries to run code on load."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", ["pickled-object", "damaged"])
def test_a_crafted_or_damaged_model_file_is_refused_by_name(tmp_path, content: str, capsys) -> None:
    import torch

    path = tmp_path / "surrogate.ckpt"
    if content == "pickled-object":
        torch.save({"format": "x", "evil": _Payload()}, path)
    else:
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match="is not an rrise model file") as err:
        load_surrogate(path)
    assert "weights_only=False" not in str(err.value)
    assert "this must never run" not in capsys.readouterr().out


def test_distil_first_is_the_default_for_a_copy_of_your_model_only() -> None:
    """The profile's ``distil_steps`` (measured on users' models) for a surrogate that is a copy of the
    user's model; none for a fresh network in its place, nor for a built-in base's surrogate."""
    from types import SimpleNamespace

    from rrise.calibrate.bases import TrainedBase, UserBase
    from rrise.calibrate.profiles import get_profile

    quick = get_profile("quick")
    assert quick.distil_steps > 0 and get_profile("full").distil_steps == 0
    w = SimpleNamespace(prof=quick)
    base = build_model("cnn-small", 3, K, 8, seed=0).eval()
    user = load_user_model(base, input_size=8)
    copy = build_surrogate(user, (3, 8, 8), K, arch="auto", seed=0)
    fresh = build_surrogate(None, (3, 8, 8), K, arch="edge", seed=0)
    mine = UserBase(w=w, spec=None)
    assert mine.distil_steps(copy, "auto") == quick.distil_steps
    assert mine.distil_steps(fresh, "edge") == 0
    assert TrainedBase(w=w, spec=None).distil_steps(base, "base") == 0
