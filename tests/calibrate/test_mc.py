"""Monte Carlo for randomized smoothing, checked against a linear classifier's closed-form p(x).

For f(x) = argmax(W x + b) with two classes, f(x+ε) = 1 iff w·(x+ε) + b > 0 with w = W₁ − W₀, so
p₁(x) = Φ((w·x + b) / (σ‖w‖)) exactly, and the counts must be Binomial(n, p₁(x)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chi2, norm
from torch import nn

from rrise.calibrate import mc
from rrise.stats import clopper_pearson_lower

SIGMA = 0.5
SHAPE = (1, 4, 4)
P_TRUE = np.array([0.02, 0.2, 0.5, 0.7, 0.9, 0.99])


def _linear_model(seed: int = 0) -> tuple[nn.Module, np.ndarray, float]:
    """A 2-class linear classifier on flattened 1×4×4 inputs, with its margin direction and offset."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=gen))
        model[1].bias.copy_(torch.randn(2, generator=gen))
    weight = model[1].weight.detach().double().numpy()
    bias = model[1].bias.detach().double().numpy()
    return model.eval(), weight[1] - weight[0], float(bias[1] - bias[0])


def _inputs_with_p(w: np.ndarray, b: float, p: np.ndarray, seed: int = 1) -> np.ndarray:
    """Inputs x (float32) whose smoothed class-1 probability Φ((w·x + b)/(σ‖w‖)) is ``p``."""
    rng = np.random.default_rng(seed)
    x = rng.random((len(p), w.size))
    unit = w / np.linalg.norm(w)
    target_margin = SIGMA * np.linalg.norm(w) * norm.ppf(p)
    x += ((target_margin - (x @ w + b)) / np.linalg.norm(w))[:, None] * unit
    return x.reshape(len(p), *SHAPE).astype(np.float32)


def _true_p1(w: np.ndarray, b: float, x: np.ndarray) -> np.ndarray:
    margin = x.reshape(len(x), -1).astype(np.float64) @ w + b
    return norm.cdf(margin / (SIGMA * np.linalg.norm(w)))


@pytest.fixture(scope="module")
def linear():
    model, w, b = _linear_model()
    x = _inputs_with_p(w, b, P_TRUE)
    return model, w, b, x


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, linear):
    model = linear[0]
    path = tmp_path_factory.mktemp("onnx") / "linear.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, *SHAPE),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def _assert_binomial(counts: np.ndarray, p1: np.ndarray, n: int) -> None:
    """Counts [B, 2] are Binomial(n, p1): exact per-input tests, a joint chi-square, and ±4 s.e."""
    assert counts.dtype == np.int64 and counts.shape == (len(p1), 2)
    assert np.all(counts.sum(axis=1) == n)
    k = counts[:, 1]
    for ki, pi in zip(k, p1, strict=True):
        assert binomtest(int(ki), n, float(pi)).pvalue > 1e-3, (ki, n, pi)
    stat = np.sum((k - n * p1) ** 2 / (n * p1 * (1 - p1)))
    assert chi2.sf(stat, df=len(p1)) > 1e-3, stat
    se = np.sqrt(p1 * (1 - p1) / n)
    assert np.all(np.abs(k / n - p1) <= 4 * se), (k / n, p1)


def test_torch_counts_follow_the_binomial_law(linear):
    model, w, b, x = linear
    p1 = _true_p1(w, b, x)
    np.testing.assert_allclose(p1, P_TRUE, rtol=1e-6)
    n = 4000
    _assert_binomial(mc.sample_counts(model, x, n, SIGMA, seed=11), p1, n)


def test_onnxruntime_counts_follow_the_binomial_law(linear, onnx_path):
    import onnxruntime as ort

    _, w, b, x = linear
    p1 = _true_p1(w, b, x)
    n = 4000
    from_path = mc.sample_counts(str(onnx_path), x, n, SIGMA, seed=11)
    _assert_binomial(from_path, p1, n)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from_session = mc.sample_counts(session, torch.from_numpy(x), n, SIGMA, batch_size=333, seed=11)
    np.testing.assert_array_equal(from_session, from_path)
    _assert_binomial(mc.sample_counts(onnx_path, x, n, SIGMA, seed=12), p1, n)


def test_same_seed_same_counts_across_batch_sizes_and_grouping(linear, onnx_path):
    model, _, _, x = linear
    n = 2500  # not a multiple of the noise chunk: the last chunk is partial
    for backend in (model, onnx_path):
        ref = mc.sample_counts(backend, x, n, SIGMA, batch_size=1000, seed=5)
        for bs in (7, 64, 4096):
            np.testing.assert_array_equal(mc.sample_counts(backend, x, n, SIGMA, bs, seed=5), ref)
        one_by_one = [
            mc.sample_counts(backend, x[i], n, SIGMA, batch_size=64, seed=5, index_offset=i)
            for i in range(len(x))
        ]
        np.testing.assert_array_equal(np.stack(one_by_one), ref)
        halves = [
            mc.sample_counts(backend, x[:4], n, SIGMA, 300, seed=5),
            mc.sample_counts(backend, x[4:], n, SIGMA, 700, seed=5, index_offset=4),
        ]
        np.testing.assert_array_equal(np.concatenate(halves), ref)
        assert not np.array_equal(mc.sample_counts(backend, x, n, SIGMA, seed=6), ref)


def test_generator_seeds_reproducibly(linear):
    model, _, _, x = linear
    a = mc.sample_counts(model, x, 500, SIGMA, generator=torch.Generator().manual_seed(3))
    b = mc.sample_counts(model, x, 500, SIGMA, generator=torch.Generator().manual_seed(3))
    c = mc.sample_counts(model, x, 500, SIGMA, generator=np.random.default_rng(3))
    d = mc.sample_counts(model, x, 500, SIGMA, generator=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)


def test_single_input_and_inferred_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    counts = mc.sample_counts(model, x, 300, 0.3, batch_size=128, seed=0)
    assert counts.shape == (5,) and counts.dtype == np.int64 and counts.sum() == 300
    assert mc.sample_counts(model, x, 300, 0.3, num_classes=5, seed=0).shape == (5,)
    model.train()
    mc.sample_counts(model, x, 10, 0.3, seed=0)
    assert model.training  # the caller's mode is restored


def test_certify_radius_is_recomputed_from_its_own_counts(linear):
    model, w, b, x = linear
    alpha, n0, n = 0.001, 100, 2000
    res = mc.certify(model, x, n0, n, SIGMA, alpha, batch_size=512, seed=0)
    assert res.counts_selection.shape == (len(x), 2) and res.counts_estimation.shape == (len(x), 2)
    assert np.all(res.counts_selection.sum(1) == n0) and np.all(res.counts_estimation.sum(1) == n)
    top = res.counts_selection.argmax(axis=1)
    k = res.counts_estimation[np.arange(len(x)), top]
    p_lower = clopper_pearson_lower(k, n, alpha)
    np.testing.assert_allclose(res.p_lower, p_lower, rtol=1e-12)
    certified = p_lower >= 0.5
    np.testing.assert_array_equal(res.pred, np.where(certified, top, -1))
    np.testing.assert_allclose(res.radius, np.where(certified, SIGMA * norm.ppf(p_lower), 0.0))
    assert certified[[0, 1, 5]].all() and not certified[2]
    # sound against the exact smoothed radius σ·Φ⁻¹(p_A) of a linear classifier
    p1 = _true_p1(w, b, x)
    p_top = np.where(top == 1, p1, 1 - p1)
    assert np.all(res.radius[certified] <= SIGMA * norm.ppf(p_top[certified]) + 1e-9)
    np.testing.assert_array_equal(res.pred[[0, 1, 4, 5]], [0, 0, 1, 1])
    # selection and estimation use independent draws, not the same stream cut twice
    same_n = mc.certify(model, x, n, n, SIGMA, alpha, seed=0)
    assert not np.array_equal(same_n.counts_selection, same_n.counts_estimation)


def test_certify_abstains_on_the_decision_boundary(linear, onnx_path):
    _, w, b, _ = linear
    boundary = _inputs_with_p(w, b, np.array([0.5]), seed=7)[0]
    for backend in (linear[0], onnx_path):
        res = mc.certify(backend, boundary, 100, 2000, SIGMA, 0.001, seed=1)
        assert len(res) == 1 and res.abstain[0] and res.pred[0] == -1 and res.radius[0] == 0.0
        assert res.p_lower[0] < 0.5


def test_certify_abstains_when_the_lower_bound_is_exactly_one_half(linear, monkeypatch):
    """p̲ = 1/2 certifies nothing (radius σ·Φ⁻¹(1/2) = 0 and no class has a majority): abstain."""
    monkeypatch.setattr(mc, "clopper_pearson_lower", lambda k, n, a: np.full(np.shape(k), 0.5))
    _, w, b, _ = linear
    x = _inputs_with_p(w, b, np.array([0.99]), seed=3)
    res = mc.certify(linear[0], x, 10, 50, SIGMA, 0.001, seed=1)
    assert res.p_lower[0] == 0.5 and res.abstain[0] and res.pred[0] == -1 and res.radius[0] == 0.0


def test_predict_abstains_near_ties_and_answers_clear_cases(linear):
    model, _, _, x = linear
    pred = mc.predict(model, x, 1000, SIGMA, alpha=0.001, seed=0)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, [0, 0, -1, 1, 1, 1])


def test_nan_input_is_rejected_with_its_index(linear, onnx_path):
    model, _, _, x = linear
    bad = x.copy()
    bad[3, 0, 1, 2] = np.nan
    for backend in (model, onnx_path):
        with pytest.raises(ValueError, match="index 3"):
            mc.sample_counts(backend, bad, 10, SIGMA, seed=0)
    bad[3, 0, 1, 2] = np.inf
    with pytest.raises(ValueError, match="index 3"):
        mc.certify(model, bad, 10, 10, SIGMA, 0.01)


def test_shape_and_width_errors(linear, onnx_path):
    model, _, _, x = linear
    for backend in (model, onnx_path):
        with pytest.raises(ValueError, match="num_classes=3") as info:
            mc.sample_counts(backend, x, 10, SIGMA, num_classes=3, seed=0)
        assert "2 classes" in str(info.value)
        with pytest.raises(ValueError, match="shape"):
            mc.sample_counts(backend, x[0, 0, 0], 10, SIGMA, seed=0)
        with pytest.raises(ValueError):
            mc.sample_counts(backend, np.zeros((2, 1, 5, 5), np.float32), 10, SIGMA, seed=0)
    with pytest.raises(ValueError, match="n >= 1"):
        mc.sample_counts(model, x, 0, SIGMA, seed=0)
    with pytest.raises(TypeError):
        mc.sample_counts(object(), x, 10, SIGMA, seed=0)


def test_cpu_backends_draw_the_same_noise(linear, onnx_path):
    model, _, _, x = linear
    torch_counts = mc.sample_counts(model, x, 3000, SIGMA, batch_size=700, seed=9, backend="torch")
    ort_counts = mc.sample_counts(onnx_path, x, 3000, SIGMA, batch_size=300, seed=9)
    exported = mc.sample_counts(model, x, 3000, SIGMA, seed=9, backend="onnxruntime")
    np.testing.assert_array_equal(torch_counts, ort_counts)
    np.testing.assert_array_equal(exported, ort_counts)


def test_auto_keeps_the_faster_backend_and_names_it(linear, monkeypatch):
    model, _, _, x = linear
    speeds = {"torch": 2e-6, "onnxruntime": 1e-6}
    monkeypatch.setattr(mc, "_seconds_per_draw", lambda be, *a, **k: speeds[be.name])
    fast = mc.prepare_model(model, "auto", sample=x)
    assert fast.backend == "onnxruntime" and fast.label == "onnxruntime (auto: 2.0x torch)"
    speeds["torch"] = 1e-7
    slow = mc.prepare_model(model, "auto", sample=x)
    assert slow.backend == "torch" and slow.target is model and slow.label.startswith("torch:cpu (auto")
    ref = mc.sample_counts(model, x, 300, SIGMA, seed=2, backend="torch")
    np.testing.assert_array_equal(mc.sample_counts(fast, x, 300, SIGMA, seed=2), ref)
    # small jobs skip the probe (its cost would exceed the gain) and stay on torch
    monkeypatch.setattr(mc, "_seconds_per_draw", lambda *a, **k: pytest.fail("probed a small job"))
    mc.sample_counts(model, x, 10, SIGMA, seed=0)


def test_auto_probe_is_not_decided_by_one_burst_of_load(linear, monkeypatch):
    """The probe times the backends in turn over several rounds and keeps each one's median: a
    burst of other load during one pass (here 20x on onnxruntime's first) cannot flip the choice."""
    model, _, _, x = linear
    calls = {"torch": 0, "onnxruntime": 0}

    def timed(be, *a, **k):
        calls[be.name] += 1
        slow = be.name == "onnxruntime" and calls[be.name] == 1
        return {"torch": 2e-6, "onnxruntime": 1e-6}[be.name] * (20 if slow else 1)

    monkeypatch.setattr(mc, "_seconds_per_draw", timed)
    prepared = mc.prepare_model(model, "auto", sample=x)
    assert prepared.backend == "onnxruntime" and prepared.label == "onnxruntime (auto: 2.0x torch)"
    assert calls == {"torch": mc.PROBE_ROUNDS, "onnxruntime": mc.PROBE_ROUNDS}


def test_backend_options_are_checked(linear, onnx_path):
    model, _, _, x = linear
    with pytest.raises(ValueError, match="backend must be one of"):
        mc.sample_counts(model, x, 10, SIGMA, seed=0, backend="tensorflow")
    with pytest.raises(ValueError, match="needs a torch nn.Module"):
        mc.sample_counts(onnx_path, x, 10, SIGMA, seed=0, backend="torch")
    with pytest.raises(ValueError, match="autocast"):
        mc.sample_counts(model, x, 10, SIGMA, seed=0, backend="torch", autocast="int4")
    bad = x.copy()
    bad[4, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="index 4"):  # before any export or probe
        mc.sample_counts(model, bad, 10, SIGMA, seed=0, backend="onnxruntime")
    # channels_last (meant for GPUs) gives the same votes on the CPU
    cl = mc.sample_counts(model, x, 500, SIGMA, seed=1, backend="torch", channels_last=True)
    np.testing.assert_array_equal(cl, mc.sample_counts(model, x, 500, SIGMA, seed=1, backend="torch"))


# --------------------------------------------------------------------------------------------------
# The prepared form remembered per module (sample_counts as users call it, again and again)


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()


def _count_exports(monkeypatch) -> list[int]:
    calls = []
    real = mc._export_onnx_bytes
    monkeypatch.setattr(mc, "_export_onnx_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_repeated_calls_export_and_probe_a_module_once(monkeypatch):
    model = _small_cnn()
    x = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
    exports = _count_exports(monkeypatch)
    probes = []
    monkeypatch.setattr(
        mc,
        "_seconds_per_draw",
        lambda be, *a, **k: probes.append(be.name) or {"torch": 2.0, "onnxruntime": 1.0}[be.name],
    )
    monkeypatch.setattr(mc, "AUTO_PROBE_MIN_DRAWS", 2000)
    n = mc.AUTO_PROBE_MIN_DRAWS // 4  # one big call: probed
    first = mc.sample_counts(model, x, n, SIGMA, batch_size=4000, seed=1)
    assert len(exports) == 1 and probes == ["torch", "onnxruntime"] * mc.PROBE_ROUNDS
    for seed in (2, 3, 1):
        again = mc.sample_counts(model, x, n, SIGMA, batch_size=4000, seed=seed)
    assert len(exports) == 1 and len(probes) == 2 * mc.PROBE_ROUNDS  # remembered: no export, no probe
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(again, mc.sample_counts(model, x, n, SIGMA, 4000, seed=1, backend="torch"))


def test_small_calls_switch_once_their_draws_add_up(monkeypatch):
    model = _small_cnn(1)
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    exports = _count_exports(monkeypatch)
    monkeypatch.setattr(
        mc, "_seconds_per_draw", lambda be, *a, **k: {"torch": 2.0, "onnxruntime": 1.0}[be.name]
    )
    per_call = 2 * 1000
    calls = mc.AUTO_PROBE_CUMULATIVE_DRAWS // per_call
    for i in range(calls - 1):  # below the cumulative threshold: torch, no export
        mc.sample_counts(model, x, 1000, SIGMA, seed=i)
    assert not exports
    mc.sample_counts(model, x, 1000, SIGMA, seed=0)
    assert len(exports) == 1
    prepared = mc._remembered(
        model, "auto", x, 10, {"batch_size": 1000, "channels_last": False, "autocast": None}
    )
    assert prepared.backend == "onnxruntime" and prepared.label == "onnxruntime (auto: 2.0x torch)"


def test_changed_weights_are_noticed_and_stale_twins_never_run(monkeypatch):
    model = _small_cnn(2)
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    exports = _count_exports(monkeypatch)
    run = lambda: mc.sample_counts(model, x, 300, SIGMA, seed=4, backend="onnxruntime")  # noqa: E731
    before = run()
    digest = mc.weights_digest(model)
    assert len(exports) == 1 and len(digest) == 32
    with torch.no_grad():
        model[3].bias.copy_(torch.tensor([5.0, -5.0, -5.0]))  # in place: class 0 always wins
    after = run()
    assert len(exports) == 2 and (after[:, 0] == 300).all() and not np.array_equal(after, before)
    model[3].bias.data.copy_(torch.tensor([-5.0, 5.0, -5.0]))  # through .data: no version bump
    assert (run()[:, 1] == 300).all() and len(exports) == 3
    model[1] = nn.Tanh()  # the module tree changed (no parameter did)
    assert mc.weights_digest(model) != digest
    run()
    assert len(exports) == 4
    run()
    assert len(exports) == 4
    mc.forget(model)
    run()
    assert len(exports) == 5


def test_remembered_forms_are_held_weakly():
    import gc
    import weakref

    model = _small_cnn(3)
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    mc.sample_counts(model, x, 50, SIGMA, seed=0, backend="onnxruntime")
    assert model in mc._MEMOS
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # the memo (and its ONNX session) did not keep the module alive


def test_nan_model_outputs_name_the_input_index(linear):
    class NanOnSecond(nn.Module):
        def forward(self, x):
            out = torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)
            bad = (x[:, 0, 0, 0] > 10).unsqueeze(1)
            return torch.where(bad, torch.full_like(out, float("nan")), out)

    x = np.zeros((3, *SHAPE), np.float32)
    x[1, 0, 0, 0] = 100.0
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(ValueError, match="NaN or inf on 50 of 50 noisy draws of input index 6"):
            mc.sample_counts(NanOnSecond(), x, 50, 0.1, seed=0, index_offset=5, backend=backend)
