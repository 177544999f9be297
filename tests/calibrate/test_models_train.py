"""Models (shapes, normalization, ONNX export, save/load) and the two training loops on sklearn digits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rrise.calibrate.model_files import load_model, save_model
from rrise.calibrate.models import Normalize, build_model
from rrise.calibrate.train import mean_kl, predict_probs, train_base, train_surrogate
from rrise.datasets import load_dataset

SHAPES = [(1, 8), (1, 28), (3, 32)]
PLAIN_OPS = {"Sub", "Div", "Conv", "Relu", "MaxPool", "AveragePool", "Flatten", "Gemm", "Reshape"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the conv and linear layers for one input."""
    total = 0

    def hook(module, _inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out[0].numel() * module.in_channels * int(np.prod(module.kernel_size))
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("arch", ["cnn", "cnn-small"])
@pytest.mark.parametrize("channels,size", SHAPES)
def test_build_model_output_shapes(arch, channels, size):
    model = build_model(arch, channels, 7, size).eval()
    x = torch.rand(3, channels, size, size)
    out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("channels,size", SHAPES)
def test_small_surrogate_needs_about_four_times_fewer_flops(channels, size):
    shape = (channels, size, size)
    ratio = _macs(build_model("cnn", *shape[:1], 10, size), shape) / _macs(
        build_model("cnn-small", channels, 10, size), shape
    )
    assert 3.0 <= ratio <= 5.0, ratio


def test_normalize_is_per_channel_and_inside_the_model():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0], channels=3)
    x = torch.ones(2, 3, 4, 4)
    expected = torch.tensor([1.8, 3.2, 0.35]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), expected)
    model = build_model("cnn", 3, 10, 32, mean=[0.1, 0.2, 0.3], std=0.5)
    assert isinstance(model[0], Normalize)
    torch.testing.assert_close(model[0].std.flatten(), torch.full((3,), 0.5))
    with pytest.raises(ValueError):
        Normalize([0.1, 0.2], 0.5, channels=3)
    with pytest.raises(ValueError):
        build_model("resnet", 1, 10, 28)


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_onnx_export_uses_plain_ops_and_matches_torch(tmp_path, channels, size):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("cnn", channels, 10, size, mean=0.3, std=0.2).eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, channels, size, size),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops <= PLAIN_OPS, ops - PLAIN_OPS
    x = torch.rand(5, channels, size, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model("cnn-small", 3, 4, 32, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).eval()
    path = tmp_path / "sub" / "model.pt"
    save_model(
        model,
        path,
        arch="cnn-small",
        in_channels=3,
        num_classes=4,
        image_size=32,
        mean=[0.4, 0.5, 0.6],
        std=[0.2, 0.25, 0.3],
        sigma=np.float64(0.25),
        classes=("a", "b", "c", "d"),
        history={"kl": np.array([0.5, 0.2])},
    )
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    loaded, meta = load_model(path)
    assert not loaded.training
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert meta["arch"] == "cnn-small" and meta["image_size"] == 32 and meta["num_classes"] == 4
    assert meta["mean"] == pytest.approx([0.4, 0.5, 0.6]) and meta["sigma"] == 0.25
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["history"]["kl"] == [0.5, 0.2]
    with pytest.raises(TypeError):
        save_model(
            model,
            tmp_path / "bad.pt",
            arch="cnn-small",
            in_channels=3,
            num_classes=4,
            image_size=32,
            mean=0.5,
            std=0.5,
            opaque=object(),
        )
    assert not (tmp_path / "bad.pt").exists()
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an rrise model"):
        load_model(tmp_path / "other.pt")


def test_train_base_on_digits_reaches_high_clean_accuracy(digits):
    train, test = digits
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 8)
    trained = train_base(
        model,
        train.images,
        train.labels,
        sigma=0.25,
        epochs=6,
        batch_size=64,
        lr=2e-3,
        seed=0,
        show_progress=False,
    )
    assert trained is model and not model.training
    accuracy = np.mean(predict_probs(model, test.images).argmax(axis=1) == test.labels)
    assert accuracy > 0.8, accuracy


def test_train_base_is_deterministic_given_seed(digits):
    train, _ = digits
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn-small", 1, 10, 8)
        train_base(
            model,
            train.images[:256],
            train.labels[:256],
            sigma=0.5,
            epochs=1,
            batch_size=64,
            seed=7,
            show_progress=False,
        )
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def _soft_counts(labels: np.ndarray, rng: np.random.Generator, n: int = 100) -> np.ndarray:
    """MC-like counts: 70% mass on the label, the rest spread by a fixed per-class pattern."""
    base = np.full((10, 10), 0.3 / 9)
    np.fill_diagonal(base, 0.7)
    return np.stack([rng.multinomial(n, base[y]) for y in labels]).astype(np.int64)


def test_train_surrogate_reduces_kl_and_selects_on_validation(digits):
    train, test = digits
    rng = np.random.default_rng(0)
    counts, val_counts = _soft_counts(train.labels, rng), _soft_counts(test.labels, rng)
    torch.manual_seed(0)
    model = build_model("cnn-small", 1, 10, 8)
    before = mean_kl(model, test.images, val_counts)
    model, history = train_surrogate(
        model,
        train.images,
        counts,
        epochs=4,
        batch_size=64,
        lr=3e-3,
        seed=0,
        val_images=test.images,
        val_counts=val_counts,
        show_progress=False,
    )
    assert set(history) == {"train_kl", "val_kl", "best_epoch"}
    assert len(history["train_kl"]) == len(history["val_kl"]) == 4
    assert history["train_kl"][-1] < history["train_kl"][0]
    best = history["best_epoch"]
    assert best == int(np.argmin(history["val_kl"]))
    after = mean_kl(model, test.images, val_counts)
    assert after == pytest.approx(history["val_kl"][best], rel=1e-5)
    assert after < 0.5 * before, (before, after)
    probs = predict_probs(model, test.images[:20])
    assert probs.shape == (20, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_train_surrogate_without_validation_and_bad_counts(digits):
    train, _ = digits
    x, y = train.images[:128], train.labels[:128]
    counts = _soft_counts(y, np.random.default_rng(1))
    model, history = train_surrogate(
        build_model("cnn-small", 1, 10, 8), x, counts, epochs=2, show_progress=False
    )
    assert history["val_kl"] == [] and history["best_epoch"] == 1 and len(history["train_kl"]) == 2
    bad = counts.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match="row 3"):
        train_surrogate(model, x, bad, epochs=1, show_progress=False)
    with pytest.raises(ValueError):
        train_surrogate(model, x, counts[:10], epochs=1, show_progress=False)


def test_surrogate_checkpoint_resumes_to_the_same_weights(digits, tmp_path):
    """A crash after epoch 2 of 4, then a rerun with the same checkpoint: identical final weights."""
    from rrise.calibrate.train import train_surrogate

    train, test = digits
    x, y = train.images[:256], train.labels[:256]
    rng = np.random.default_rng(2)
    counts, val_counts = _soft_counts(y, rng), _soft_counts(test.labels[:64], rng)
    kw = dict(
        epochs=4, batch_size=64, seed=3, val_images=test.images[:64], val_counts=val_counts,
        show_progress=False, augment="shift+flip",
    )  # fmt: skip

    def fresh():
        torch.manual_seed(0)
        return build_model("cnn-small", 1, 10, 8)

    straight, h_straight = train_surrogate(fresh(), x, counts, **kw)

    class Crash(Exception):
        pass

    def crash_after_two(epoch, _history):
        if epoch == 1:
            raise Crash

    ckpt = tmp_path / "s.ckpt"
    with pytest.raises(Crash):
        train_surrogate(fresh(), x, counts, checkpoint=ckpt, on_epoch_end=crash_after_two, **kw)
    assert ckpt.exists()
    epochs_run = []
    resumed, h_resumed = train_surrogate(
        fresh(), x, counts, checkpoint=ckpt, on_epoch_end=lambda e, h: epochs_run.append(e), **kw
    )
    assert epochs_run == [2, 3]  # only the epochs the crash left
    assert h_resumed == h_straight
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # a checkpoint made with other settings is refused, not silently mixed in
    with pytest.raises(ValueError, match="other settings"):
        train_surrogate(fresh(), x, counts, checkpoint=ckpt, **{**kw, "seed": 4})


def test_augment_batch_shifts_and_flips_without_changing_content():
    from rrise.calibrate.train import augment_batch

    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3:5, 2:4] = 1.0  # a 2×2 blob away from the border
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, "shift", gen)
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing clipped
    assert (out != x).any(dim=(1, 2, 3)).float().mean() > 0.7  # most images moved
    flipped = augment_batch(x, "flip", gen)
    moved = (flipped != x).any(dim=(1, 2, 3))
    assert 0.2 < moved.float().mean() < 0.8 and torch.equal(flipped[moved], x[moved].flip(-1))
    assert augment_batch(x, "none", gen) is x
    with pytest.raises(ValueError, match="augment"):
        augment_batch(x, "rotate", gen)


def test_seeded_models_start_from_the_same_weights_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("cnn-small", 1, 10, 8, seed=7)
    b = build_model("cnn-small", 1, 10, 8, seed=7)
    c = build_model("cnn-small", 1, 10, 8, seed=8)
    assert torch.equal(torch.rand(3), expected_next)  # the global stream did not move
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))
