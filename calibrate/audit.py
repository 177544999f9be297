"""Spot-check a bundle's certificates against fresh Monte Carlo with the bundle's own base model.

A certificate claims p_Â(x) ≥ p̃. The audit draws ``n_mc`` fresh noisy copies of each input through
``base.onnx`` and counts a violation when p̃ exceeds the one-sided (1 − ``alpha_ref``) Clopper–Pearson
upper bound of the observed frequency of Â: evidence at level ``alpha_ref`` that p_Â(x) < p̃. Over the
audited inputs, the bundle's guarantee allows a violation rate of at most α + β; a one-sided binomial
test says whether the observed count is compatible with that.

The test sees an excess of p̃ over the truth only from its detection limit up
(:func:`~rrise.calibrate.measures.detection_limit`): at ``n_mc`` = 2,000 that is 0.0028 at
p̃ = 0.9993 (the cap of N_cal = 10⁴), a truth of 0.9965 and a radius 0.5σ too large; at the default
``DEFAULT_AUDIT_DRAWS`` = 20,000 it is 0.0007. Every result reports its own limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rrise.bundle import Bundle
from rrise.certificate import certify_from_probs
from rrise.datasets import DATASETS
from rrise.runtime.backends import make_backend, variant_max_batch

from .mc import sample_counts
from .measures import detection_limit, reference_violations

__all__ = ["DEFAULT_AUDIT_DRAWS", "AuditResult", "audit_bundle", "bundle_dataset"]

# Fresh draws per audited input: enough to see an over-claim near the cap (see the module docstring).
DEFAULT_AUDIT_DRAWS = 20_000


@dataclass
class AuditResult:
    pred: np.ndarray  # -1 = abstain
    radius: np.ndarray
    p_lower: np.ndarray
    mc_count: np.ndarray  # fresh MC count of the certified class
    mc_upper: np.ndarray
    violation: np.ndarray
    n_mc: int
    allowed_rate: float
    p_value: float  # P(X ≥ violations) for X ~ Binomial(certified, α + β)
    # smallest excess of p̃ over the truth the test flags at least half the time: median and
    # largest over the certified inputs (0 when none is certified)
    detection_limit: tuple[float, float] = (0.0, 0.0)

    @property
    def certified(self) -> int:
        return int(np.sum(self.pred >= 0))

    @property
    def violations(self) -> int:
        return int(np.sum(self.violation))


def bundle_dataset(bundle: Bundle | str | Path) -> str:
    """The built-in dataset a bundle was calibrated on (its manifest's ``calibration.dataset``): where
    ``rrise audit`` draws inputs from by default. ValueError, naming ``--dataset``, when the bundle was
    calibrated on anything else (a user's images)."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify=False)
    name = b.manifest.get("calibration", {}).get("dataset")
    if name not in DATASETS:
        raise ValueError(
            f"bundle {b.path} was calibrated on {name!r}, not a built-in dataset: give --dataset "
            f"({'|'.join(DATASETS)}) with inputs from its deployment distribution"
        )
    return str(name)


def _deployed_probs(bundle: Bundle, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """The fp32 variant's probabilities on ``images``, computed exactly as the runtime computes them:
    the runtime's own backend (the variant's ``calibrated_with`` providers) in batches of at most the
    variant's ``max_batch``, so the audit checks the numerics its quantile was calibrated for."""
    backend, variant = make_backend(bundle, "onnxruntime", precision="fp32")
    x = np.ascontiguousarray(images, dtype=np.float32)
    step = variant_max_batch(variant)
    probs = np.concatenate([backend.run(x[i : i + step]) for i in range(0, len(x), step)])
    return probs, variant


def audit_bundle(
    bundle: Bundle | str | Path,
    images: np.ndarray,
    *,
    n_mc: int = DEFAULT_AUDIT_DRAWS,
    alpha_ref: float = 0.001,
    seed: int = 12345,
    batch_size: int = 1_000,
    show_progress: bool = True,
) -> AuditResult:
    """Certify ``images`` with the bundle's fp32 variant and check each against fresh MC."""
    from scipy.stats import binom

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    probs, variant = _deployed_probs(b, images)
    cal = b.calibration(variant)
    cert = certify_from_probs(probs, cal)
    counts = sample_counts(
        str(b.file(b.manifest["base_model"]["file"])),
        images,
        n=n_mc,
        sigma=b.sigma,
        batch_size=batch_size,
        seed=seed,
        show_progress=show_progress,
    )
    k, upper, violation = reference_violations(
        cert.top_class, ~cert.abstain, cert.p_lower, counts, level=alpha_ref
    )
    allowed = cal.alpha + cal.beta
    n_cert, v = int(np.sum(~cert.abstain)), int(np.sum(violation))
    p_value = float(binom.sf(v - 1, n_cert, allowed)) if n_cert else 1.0
    limit = detection_limit(cert.p_lower[~cert.abstain], n_mc, alpha_ref) if n_cert else np.zeros(1)
    return AuditResult(
        pred=cert.pred,
        radius=cert.radius,
        p_lower=cert.p_lower,
        mc_count=k,
        mc_upper=upper,
        violation=violation,
        n_mc=n_mc,
        allowed_rate=allowed,
        p_value=p_value,
        detection_limit=(float(np.median(limit)), float(np.max(limit))),
    )
