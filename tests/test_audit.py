"""rrise audit: a bundle's certificates, computed with the runtime's own numerics, against fresh MC."""

import numpy as np

from rrise import Bundle, certify_from_probs
from rrise.calibrate.audit import audit_bundle
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
    assert result.allowed_rate == bundle.calibration().alpha + bundle.calibration().beta
    assert 0 <= result.violations <= result.certified and 0.0 <= result.p_value <= 1.0
