"""rrise audit: a bundle's certificates, computed with the runtime's own numerics, against fresh MC."""

import numpy as np

from rrise import Bundle, certify_from_probs
from rrise.calibrate.audit import audit_bundle, violation_p_value
from rrise.fileio import load_npz
from rrise.runtime.backends import make_backend


def test_audit_certifies_with_the_runtime_numerics_and_counts_violations(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    images = load_npz(bundle.file("calibration.npz"), ("images",))["images"][:24]
    result = audit_bundle(bundle, images, n_mc=300, show_progress=False)
    backend, variant = make_backend(bundle, "onnxruntime", precision="fp32")
    assert backend.session.get_providers()[0] == "CPUExecutionProvider"  # as calibrated_with says
    per_frame = np.concatenate([backend.run(x[None]) for x in images])  # the runtime's batch-1 path
    cert = certify_from_probs(per_frame, bundle.calibration(variant))
    np.testing.assert_array_equal(result.pred, cert.pred)
    np.testing.assert_array_equal(result.p_lower, cert.p_lower)
    assert result.certified == int(np.sum(cert.pred >= 0)) and result.n_mc == 300
    assert result.allowed_rate == bundle.calibration().alpha + bundle.calibration().beta + 0.001
    assert 0 <= result.violations <= result.certified and 0.0 <= result.p_value <= 1.0
    assert result.p_value == violation_p_value(result.violations, len(images), result.allowed_rate)


def test_the_audit_test_counts_over_all_inputs_and_the_references_false_alarms():
    """A sound bundle flags at most α + β + alpha_ref of all audited inputs. Testing the flags among
    the certified inputs at α + β rejected sound bundles that abstain often: here 3 flags among 100
    certified of 300 audited at α + β = 0.011 gave p = 0.099 under the old rule, 0.70 now."""
    from scipy.stats import binom

    old = float(binom.sf(2, 100, 0.011))
    new = violation_p_value(3, 300, 0.011 + 0.001)
    assert old < 0.11 < 0.6 < new
    assert violation_p_value(0, 300, 0.012) == 1.0 and violation_p_value(5, 0, 0.012) == 1.0
    # simulated sound bundles (half abstaining, wrong certificates at exactly α + β, the reference's
    # false alarms at alpha_ref): the new test rejects at p < 0.01 at most ~1 % of the time
    rng = np.random.default_rng(0)
    flags = rng.binomial(300, 0.012, size=4000)
    rejected = np.mean([violation_p_value(int(v), 300, 0.012) < 0.01 for v in flags])
    old_rejected = np.mean([float(binom.sf(v - 1, 150, 0.011)) < 0.01 for v in flags])
    assert rejected <= 0.012 < 0.05 < old_rejected


def test_adaptive_audit_checks_every_record_by_the_path_that_certified_it(tiny_bundle):
    from rrise.calibrate.audit import audit_adaptive
    from rrise.runtime.adaptive import McOptions
    from rrise.stats import clopper_pearson_upper

    bundle = Bundle.load(tiny_bundle)
    images = load_npz(bundle.file("calibration.npz"), ("images",))["images"][:16]
    mc = McOptions(mc_budget=1024, mc_batch=256, require_radius=0.25)
    result = audit_adaptive(bundle, images, mc, n_mc=300, show_progress=False)
    backend, variant = make_backend(bundle, "onnxruntime", precision="fp32")
    first = certify_from_probs(
        np.concatenate([backend.run(x[None]) for x in images]), bundle.calibration(variant)
    )
    surrogate_radius = np.where(first.abstain, 0.0, first.radius)
    # routed as `rrise run --require-radius 0.25`: draws only below it; the larger certificate kept
    np.testing.assert_array_equal(result.mc_draws > 0, surrogate_radius < 0.25)
    assert np.all(result.mc_draws <= 1024) and np.all(result.radius >= surrogate_radius - 1e-12)
    by = result.certified_by
    assert set(by) <= {"surrogate", "mc", ""} and np.array_equal(by == "", result.pred < 0)
    assert np.all(result.mc_draws[by == "surrogate"] == 0)
    np.testing.assert_array_equal(result.p_lower[by == "surrogate"], first.p_lower[by == "surrogate"])
    # each certificate, whichever path gave it, against the fresh reference count of its class
    upper = clopper_pearson_upper(result.mc_count, 300, 0.001)
    np.testing.assert_allclose(result.mc_upper, upper)
    np.testing.assert_array_equal(result.violation, (result.pred >= 0) & (result.p_lower > upper))
    paths = result.paths
    assert set(paths) == {"surrogate", "mc"}
    assert paths["surrogate"].certified + paths["mc"].certified == result.certified
    assert paths["mc"].certified == int(np.sum(by == "mc")) > 0
    for path in paths.values():
        lo, hi = path.ci95
        assert path.violations == int(np.sum(result.violation & (by == path.path)))
        assert 0.0 <= lo <= path.rate <= hi <= 1.0
    cal = bundle.calibration()
    assert result.allowed_rate == cal.alpha + cal.beta + mc.mc_alpha + 0.001 and 0.0 <= result.p_value <= 1.0
    assert 0.0 < result.detection_limit[0] <= result.detection_limit[1] < 1.0
    again = audit_adaptive(bundle, images, mc, n_mc=300, show_progress=False)  # seeded: reproducible
    np.testing.assert_array_equal(again.p_lower, result.p_lower)
