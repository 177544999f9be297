"""Spot-check a bundle's certificates against fresh Monte Carlo with the bundle's own base model.

A certificate claims p_Â(x) ≥ p̃. The audit draws ``n_mc`` fresh noisy copies of each input through
``base.onnx`` and counts a violation when p̃ exceeds the one-sided (1 − ``alpha_ref``) Clopper–Pearson
upper bound of the observed frequency of Â: evidence at level ``alpha_ref`` that p_Â(x) < p̃. The
bundle's guarantee bounds the rate of wrong certificates over all inputs (an abstention is never
wrong) by α + β, and the reference test flags a sound certificate with probability at most
``alpha_ref``; so over the audited inputs a sound bundle's flagged rate is at most
α + β + ``alpha_ref`` (:func:`violation_p_value`), and a one-sided binomial test says whether the
observed count is compatible with that. (Testing among certified inputs only, or without the
reference's own false alarms, failed sound bundles too often.)

The test sees an excess of p̃ over the truth only from its detection limit up
(:func:`~rrise.calibrate.measures.detection_limit`): at ``n_mc`` = 2,000 that is 0.0028 at
p̃ = 0.9993 (the cap of N_cal = 10⁴), a truth of 0.9965 and a radius 0.5σ too large; at the default
``DEFAULT_AUDIT_DRAWS`` = 20,000 it is 0.0007. Every result reports its own limit.

Adaptive records (``rrise audit --mc-budget N [--require-radius R]``, :func:`audit_adaptive`): the
audit runs the runtime's adaptive certifier (:class:`rrise.runtime.routing.AdaptiveCertifier`, routed
and budgeted as ``rrise run`` with the same options) on the audit inputs and checks each record's
certificate, whichever path gave it (``surrogate`` or ``mc``), with the same test against fresh
draws independent of the runtime's. Per path it reports the violations among that path's
certificates, their rate and its two-sided 95% Clopper–Pearson interval; the binomial test is on
the violations among all audited inputs against α + β + A, the composed guarantee's bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rrise.bundle import Bundle
from rrise.certificate import certify_from_probs
from rrise.datasets import DATASETS
from rrise.runtime.adaptive import McCertifier, McOptions, McRefused
from rrise.runtime.backends import make_backend, variant_max_batch
from rrise.runtime.routing import BY_MC, BY_SURROGATE, AdaptiveCertifier, Routing
from rrise.sequential import largest_certifiable_radius
from rrise.stats import clopper_pearson_lower, clopper_pearson_upper

from .mc import sample_counts
from .measures import detection_limit, reference_violations

__all__ = [
    "DEFAULT_AUDIT_DRAWS",
    "AdaptiveAuditResult",
    "AuditResult",
    "PathAudit",
    "audit_adaptive",
    "audit_bundle",
    "bundle_dataset",
]

# Fresh draws per audited input: enough to see an over-claim near the cap (see the module docstring).
DEFAULT_AUDIT_DRAWS = 20_000


class _Counts:
    """What both audit results count: certified records (``pred`` ≥ 0) and refuted ones."""

    pred: np.ndarray
    violation: np.ndarray

    @property
    def certified(self) -> int:
        return int(np.sum(self.pred >= 0))

    @property
    def violations(self) -> int:
        return int(np.sum(self.violation))


@dataclass
class AuditResult(_Counts):
    pred: np.ndarray  # -1 = abstain
    radius: np.ndarray
    p_lower: np.ndarray
    mc_count: np.ndarray  # fresh MC count of the certified class
    mc_upper: np.ndarray
    violation: np.ndarray
    n_mc: int
    allowed_rate: float
    p_value: float  # P(X ≥ violations) for X ~ Binomial(audited, α + β + alpha_ref)
    # smallest excess of p̃ over the truth the test flags at least half the time: median and
    # largest over the certified inputs (0 when none is certified)
    detection_limit: tuple[float, float] = (0.0, 0.0)


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


def _reference_counts(b: Bundle, images: np.ndarray, n_mc: int, seed: int, batch_size: int, progress: bool):
    """Fresh Monte Carlo counts ``[B, K]`` of the bundle's base model on ``images``."""
    return sample_counts(
        str(b.file(b.manifest["base_model"]["file"])),
        images,
        n=n_mc,
        sigma=b.sigma,
        batch_size=batch_size,
        seed=seed,
        show_progress=progress,
    )


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

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    probs, variant = _deployed_probs(b, images)
    cal = b.calibration(variant)
    cert = certify_from_probs(probs, cal)
    counts = _reference_counts(b, images, n_mc, seed, batch_size, show_progress)
    k, upper, violation = reference_violations(
        cert.top_class, ~cert.abstain, cert.p_lower, counts, level=alpha_ref
    )
    allowed = cal.alpha + cal.beta + alpha_ref
    n_cert = int(np.sum(~cert.abstain))
    p_value = violation_p_value(int(np.sum(violation)), len(cert.pred), allowed)
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


def violation_p_value(violations: int, audited: int, allowed: float) -> float:
    """P(X ≥ ``violations``) for X ~ Binomial(``audited``, ``allowed``): small when the flagged
    certificates are more than a sound bundle gives (``allowed`` = the guarantee's rate over all
    inputs plus the reference test's own false-alarm level); 1.0 with nothing audited."""
    from scipy.stats import binom

    return float(binom.sf(violations - 1, audited, allowed)) if audited else 1.0


@dataclass(frozen=True)
class PathAudit:
    """One certification path's audit (``path``: ``surrogate`` or ``mc``): how many audited inputs
    it certified, how many of those certificates the fresh draws refute, and the rate with its
    two-sided 95% Clopper–Pearson interval (``(0, 1)`` when the path certified none)."""

    path: str
    certified: int
    violations: int

    @property
    def rate(self) -> float:
        return self.violations / self.certified if self.certified else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        if not self.certified:
            return (0.0, 1.0)
        lo = float(clopper_pearson_lower(self.violations, self.certified, 0.025))
        hi = float(clopper_pearson_upper(self.violations, self.certified, 0.025))
        return (lo, hi)


@dataclass
class AdaptiveAuditResult(_Counts):
    """:func:`audit_adaptive`'s result: per input the record's certificate (``pred`` −1 when it
    abstains), who gave it (``certified_by``: ``surrogate``, ``mc`` or empty), the draws the
    runtime spent, the fresh reference count of the certified class, its upper bound and whether it
    refutes the certificate; per path a :class:`PathAudit`; the binomial test of the violations among
    all ``audited`` inputs against ``allowed_rate`` = α + β + A."""

    pred: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    certified_by: np.ndarray
    mc_draws: np.ndarray
    mc_count: np.ndarray
    mc_upper: np.ndarray
    violation: np.ndarray
    n_mc: int
    allowed_rate: float
    p_value: float
    paths: dict[str, PathAudit]
    # as AuditResult's: median and largest over the certified inputs (0 when none is certified)
    detection_limit: tuple[float, float] = (0.0, 0.0)

    @property
    def audited(self) -> int:
        return len(self.pred)


def _adaptive_certifier(b: Bundle, mc: McOptions, seed: int) -> AdaptiveCertifier:
    """The runtime's adaptive certifier for ``mc`` (``rrise run``'s options and routing), its draws
    on onnxruntime seeded apart from the reference draws. ValueError (McRefused) naming the option."""
    if not mc.enabled:
        raise ValueError("--mc-budget must be > 0 to audit adaptive records")
    try:
        routing = Routing.of_bundle(b.manifest, mc.require_radius)
        certifier = McCertifier.from_options(b, mc, seed=seed, backend="onnxruntime")
    except McRefused:
        raise
    except ValueError as exc:  # no routing rule, an unreachable required radius: a bad option
        raise McRefused(str(exc).splitlines()[0]) from None
    top = largest_certifiable_radius(b.sigma, certifier.options)
    if routing.target_radius > top:
        certifier.close()
        raise McRefused(
            f"--mc-budget {mc.mc_budget} cannot certify the {routing.origin} target radius "
            f"{routing.target_radius:g} (the largest it can is {top:.4f}): raise --mc-budget or give "
            "--require-radius"
        )
    return AdaptiveCertifier(certifier, routing)


def audit_adaptive(
    bundle: Bundle | str | Path,
    images: np.ndarray,
    mc: McOptions,
    *,
    n_mc: int = DEFAULT_AUDIT_DRAWS,
    alpha_ref: float = 0.001,
    seed: int = 12345,
    show_progress: bool = True,
) -> AdaptiveAuditResult:
    """Certify ``images`` as ``rrise run --mc-budget …`` does (the fp32 variant's certificates,
    improved by the runtime's adaptive certifier with ``mc``, one frame per step) and check each
    record's certificate against ``n_mc`` fresh draws of the base model at level ``alpha_ref``."""

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    adaptive = _adaptive_certifier(b, mc, seed + 1)
    try:
        probs, variant = _deployed_probs(b, images)
        cal = b.calibration(variant)
        first = certify_from_probs(probs, cal)
        x = np.ascontiguousarray(images, dtype=np.float32)
        judged = [adaptive.judge([x[i]], [first[i]])[0] for i in range(len(x))]
    finally:
        adaptive.mc.close()
    certs = [j.certificate for j in judged]
    pred = np.array([-1 if c.abstain else c.top_class for c in certs], dtype=np.int64)
    p_lower = np.array([c.p_lower for c in certs], dtype=np.float64)
    by = np.array([j.certified_by or "" for j in judged], dtype=object)
    counts = _reference_counts(b, images, n_mc, seed, 1_000, show_progress)
    top = np.array([c.top_class for c in certs], dtype=np.int64)
    k, upper, violation = reference_violations(top, pred >= 0, p_lower, counts, level=alpha_ref)
    allowed = cal.alpha + cal.beta + mc.mc_alpha + alpha_ref
    limit = detection_limit(p_lower[pred >= 0], n_mc, alpha_ref) if np.any(pred >= 0) else np.zeros(1)
    paths = {
        path: PathAudit(path, int(np.sum(by == path)), int(np.sum(violation & (by == path))))
        for path in (BY_SURROGATE, BY_MC)
    }
    return AdaptiveAuditResult(
        pred=pred,
        radius=np.array([c.radius for c in certs], dtype=np.float64),
        p_lower=p_lower,
        certified_by=by,
        mc_draws=np.array([j.mc_draws for j in judged], dtype=np.int64),
        mc_count=k,
        mc_upper=upper,
        violation=violation,
        n_mc=n_mc,
        allowed_rate=allowed,
        p_value=violation_p_value(int(np.sum(violation)), len(pred), allowed),
        paths=paths,
        detection_limit=(float(np.median(limit)), float(np.max(limit))),
    )
