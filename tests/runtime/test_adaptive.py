"""Monte Carlo certification of one frame with a real bundle's base model (rrise.runtime.adaptive):
agreement with Cohen's fixed-n bound, the budget, the deadline, the wrong class, the bytes it runs."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from rrise.bundle import Bundle, BundleError
from rrise.datasets import load_dataset
from rrise.runtime.adaptive import BaseClassifier, McCertifier, McOptions, read_base_model
from rrise.sequential import (
    STOP_BUDGET,
    STOP_DEADLINE,
    STOP_FUTILITY,
    STOP_SUCCESS,
    SequentialOptions,
    lower_bound,
    radius_from_lower_bound,
)
from rrise.stats import clopper_pearson_lower
from tests.conftest import NO_TORCH_PRELUDE

N_FIXED, ALPHA = 10_000, 0.001


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Bundle:
    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="module")
def frames() -> tuple[np.ndarray, np.ndarray]:
    test = load_dataset("digits", "test")
    return test.images[:40], test.labels[:40]


@pytest.fixture(scope="module")
def cohen_counts(bundle, frames) -> np.ndarray:
    """Cohen's fixed-n counts (the calibration's own MC engine), n = 10⁴ draws per frame."""
    from rrise.calibrate.mc import sample_counts

    base = str(bundle.file(bundle.manifest["base_model"]["file"]))
    return sample_counts(base, frames[0], n=N_FIXED, sigma=bundle.sigma, batch_size=2_000, seed=7)


class CountingClassifier:
    """The base classifier, recording the batch sizes it is given and ticking a fake clock."""

    def __init__(self, inner: BaseClassifier, seconds_per_call: float = 0.0) -> None:
        self.inner, self.step, self.now, self.batches = inner, seconds_per_call, 0.0, []
        self.input_shape = inner.input_shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.now += self.step
        return self.inner(x)


def _certifier(bundle, options, seconds_per_call=0.0, seed=0):
    classify = CountingClassifier(BaseClassifier(read_base_model(bundle)), seconds_per_call)
    mc = McCertifier(
        classify, bundle.sigma, options, num_classes=bundle.num_classes, seed=seed, clock=lambda: classify.now
    )
    return mc, classify


def test_mc_radius_agrees_with_cohen_at_a_large_fixed_n(bundle, frames, cohen_counts):
    """Spending the whole budget of 10⁴ draws: the votes agree with Cohen's independent count within
    sampling error, and the radius falls short of Cohen's by at most the price of anytime validity at
    that count (the mixture against Clopper–Pearson at n = 10⁴: 0.025σ to 0.099σ) plus sampling error."""
    sigma = bundle.sigma
    mc, _ = _certifier(bundle, SequentialOptions(budget=N_FIXED, alpha=ALPHA, batch_size=2_000))
    compared = 0
    for x, counts in zip(frames[0][:12], cohen_counts[:12], strict=True):
        top = int(np.argmax(counts))
        k = int(counts[top])
        r = mc.certify(x, top)
        assert (r.draws, r.stop) == (N_FIXED, STOP_BUDGET)
        p = k / N_FIXED
        slack = int(np.ceil(5 * np.sqrt(2 * N_FIXED * p * (1 - p)))) + 2
        assert abs(r.successes - k) <= slack
        cohen = radius_from_lower_bound(float(clopper_pearson_lower(k, N_FIXED, ALPHA)), sigma)
        at_k = radius_from_lower_bound(float(lower_bound(k, N_FIXED, ALPHA)), sigma)
        assert cohen - 0.1 * sigma <= at_k <= cohen
        low = radius_from_lower_bound(float(lower_bound(max(k - slack, 0), N_FIXED, ALPHA)), sigma)
        high = radius_from_lower_bound(
            float(clopper_pearson_lower(min(k + slack, N_FIXED), N_FIXED, ALPHA)), sigma
        )
        assert low <= r.radius <= high
        compared += cohen > 0
    assert compared >= 8  # most of these frames are certified, so the radii were compared


def test_success_stops_early_with_the_required_radius(bundle, frames, cohen_counts):
    options = SequentialOptions(budget=N_FIXED, alpha=ALPHA, batch_size=128)
    mc, classify = _certifier(bundle, options)
    i = int(np.argmax(cohen_counts.max(axis=1)))  # the most confident frame
    r = mc.certify(frames[0][i], int(np.argmax(cohen_counts[i])), require_radius=0.25)
    assert r.stop == STOP_SUCCESS and r.radius >= 0.25 - 1e-12
    assert r.draws < 1_000 and sum(classify.batches) == r.draws


def test_budget_is_never_exceeded(bundle, frames, cohen_counts):
    options = SequentialOptions(budget=1_000, alpha=ALPHA, batch_size=300, first_batch=300)
    mc, classify = _certifier(bundle, options)
    r = mc.certify(frames[0][0], int(np.argmax(cohen_counts[0])))
    assert (r.draws, r.stop) == (1_000, STOP_BUDGET)
    assert classify.batches == [300, 300, 300, 100]
    # A radius no 1,000 draws can certify spends none.
    classify.batches.clear()
    r = mc.certify(frames[0][0], int(np.argmax(cohen_counts[0])), require_radius=10.0)
    assert (r.draws, r.stop, r.radius, classify.batches) == (0, STOP_FUTILITY, 0.0, [])


def test_deadline_is_respected_on_an_injected_clock(bundle, frames, cohen_counts):
    """Each base-model call takes 5 ms of a fake clock: with 12 ms, a third call would end at 15."""
    options = SequentialOptions(budget=N_FIXED, deadline_ms=12, alpha=ALPHA, batch_size=100, first_batch=100)
    mc, classify = _certifier(bundle, options, seconds_per_call=0.005)
    r = mc.certify(frames[0][0], int(np.argmax(cohen_counts[0])))
    assert (r.stop, r.draws, classify.batches) == (STOP_DEADLINE, 200, [100, 100])
    assert r.elapsed_ms == pytest.approx(10.0)


def test_a_class_the_base_model_does_not_predict_is_not_certified(bundle, frames, cohen_counts):
    """The surrogate may name a class the smoothed base model does not pick (here: the true label of
    frames the base model gets wrong, and every frame's least voted class): MC never certifies it."""
    options = SequentialOptions(budget=4_000, alpha=ALPHA, batch_size=500)
    mc, _ = _certifier(bundle, options)
    images, labels = frames
    wrong = np.flatnonzero(cohen_counts.argmax(axis=1) != labels)
    cases = [(i, int(labels[i])) for i in wrong] + [(i, int(np.argmin(cohen_counts[i]))) for i in range(8)]
    assert len(cases) > 8
    for i, cls in cases:
        r = mc.certify(images[i], cls, require_radius=0.1)
        assert not r.certified and r.radius == 0.0 and r.p_lower < 0.5
        assert r.stop == STOP_FUTILITY and r.draws < options.budget


def test_base_model_bytes_are_checked_before_the_session_opens(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    b = Bundle.load(copy)
    assert len(read_base_model(b)) > 0
    path = b.file(b.manifest["base_model"]["file"])
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="changed file base.onnx"):
        McCertifier.from_bundle(b, SequentialOptions(budget=1_000))


def test_bad_inputs_are_refused(bundle):
    mc = McCertifier.from_bundle(bundle, SequentialOptions(budget=1_000), seed=0)
    with pytest.raises(ValueError, match=r"expects input \[B, 1, 8, 8\]"):
        mc.certify(np.zeros((1, 9, 9), np.float32), 0)
    with pytest.raises(ValueError, match=r"one model input \[C, H, W\]"):
        mc.certify(np.zeros((2, 1, 8, 8), np.float32), 0)
    with pytest.raises(ValueError, match="below 10"):
        mc.certify(np.zeros((1, 8, 8), np.float32), 10)
    with pytest.raises(ValueError, match="NaN"):
        mc.certify(np.full((1, 8, 8), np.nan, np.float32), 0)


def test_runs_without_torch_or_scipy(tiny_bundle, python):
    code = NO_TORCH_PRELUDE + (
        "import numpy as np\n"
        "from rrise.bundle import Bundle\n"
        "from rrise.runtime.adaptive import McCertifier\n"
        "from rrise.sequential import SequentialOptions\n"
        f"b = Bundle.load({str(tiny_bundle)!r})\n"
        "mc = McCertifier.from_bundle(b, SequentialOptions(budget=512), seed=0)\n"
        "r = mc.certify(np.zeros((1, 8, 8), np.float32), 0)\n"
        "assert r.draws == 512, r\n"
        "assert 'scipy' not in sys.modules and 'torch' not in sys.modules\n"
    )
    subprocess.run([python, "-c", code], check=True)


def test_options_off_by_default_and_the_wiring_helpers(bundle, frames, cohen_counts):
    assert McCertifier.from_options(bundle, McOptions()) is None  # --mc-budget 0: the one-pass runtime
    mc = McCertifier.from_options(
        bundle, McOptions(mc_budget=2_000, require_radius=0.25, mc_batch=100), seed=0
    )
    i = int(np.argmax(cohen_counts.max(axis=1)))
    x, top = frames[0][i], int(np.argmax(cohen_counts[i]))
    assert mc.improve(x, top, surrogate_radius=0.3) is None  # the surrogate already certifies 0.25
    r = mc.improve(x, top, surrogate_radius=0.1)
    assert r.stop == STOP_SUCCESS and r.radius >= 0.25 - 1e-12 and 0 < r.draws <= 2_000
    assert McCertifier.from_options(bundle, McOptions(mc_budget=2_000), seed=0).improve(x, top, 0.0) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mc_budget": -1}, "--mc-budget must be a non-negative integer"),
        ({"mc_budget": 100}, "--mc-budget must be an integer of at least one batch (--mc-batch 256)"),
        ({"mc_budget": 1_000, "mc_alpha": 2.0}, "--mc-alpha must be in (0, 1)"),
        ({"mc_alpha": 0.0}, "--mc-alpha must be in (0, 1)"),
        ({"mc_budget": 1_000, "mc_deadline_ms": -5.0}, "--mc-deadline-ms must be a positive number"),
        ({"mc_budget": 1_000, "mc_batch": 0}, "--mc-batch must be a positive integer"),
        ({"require_radius": 0.5}, "--require-radius needs Monte Carlo draws"),
        ({"mc_budget": 1_000, "require_radius": 0.0}, "--require-radius must be a positive number"),
    ],
)
def test_bad_options_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        McOptions(**kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_radius_beyond_the_budget_is_refused_naming_the_largest(bundle):
    with pytest.raises(
        ValueError, match=r"--require-radius 1 is above the largest radius 0\.6\d+ that --mc-budget"
    ):
        McCertifier.from_options(bundle, McOptions(mc_budget=1_000, require_radius=1.0))
