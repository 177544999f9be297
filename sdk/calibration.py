"""The one home of split-conformal calibration (docs/CERTIFICATE.md), torch-free.

Three steps, kept apart:

1. :class:`CalibrationSpec` — everything fixed *before* the calibration inputs are seen: σ, the MC
   draws N, α, β, the PAC δ, the score transform, confidence-bin edges and the learned score map
   and scale.
   Rules (``rrise.calibrate.rules.fit_rule``) produce one from a selection split.
2. :func:`conformalize` — the one verb: a spec, the surrogate's probabilities and fresh MC count
   vectors on the calibration inputs → a :class:`Calibration`.
3. :func:`rrise.certify_from_probs` — the deployment rule, which reads the Calibration.

A :class:`Calibration` carries its spec and what it was made from (``dataset``, ``base_sha256`` of
the base model whose counts were used, ``surrogate_sha256`` of the model whose probabilities were
used), so recalibrating a precision variant is ``calibration.recalibrate(probs, counts)``. One codec,
:meth:`Calibration.to_dict` / :meth:`Calibration.from_dict`, serves ``calibration.json``, the bundle
manifest and :class:`rrise.Bundle`; ``from_dict`` validates every value and names the bad one.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from .scores import TRANSFORMS, confidence_bin, conformal_scores, p_cap
from .stats import clopper_pearson_lower, norm_ppf

__all__ = [
    "Calibration",
    "CalibrationSpec",
    "conformal_quantile",
    "conformal_rank",
    "conformalize",
    "mc_lower_bounds",
    "min_calibration_size",
    "mondrian_quantiles",
    "record_fields",
    "two_stage_lower",
]

_SHA256_LEN = 64
# A field's place in the calibration record (calibration.json, the manifest's ``calibration``), in its
# metadata: "required" or "optional" where that differs from having no default / having one.
_RECORD = "record"


def _number(name: str, value: Any, *, lo: float, hi: float, open_lo: bool, open_hi: bool) -> float:
    """``value`` as a float inside the interval, or a ValueError that names ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    if not ok:
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def _probability(name: str, value: Any) -> float:
    return _number(name, value, lo=0.0, hi=1.0, open_lo=True, open_hi=True)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _floats(name: str, values: Any) -> tuple[float, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}")
    return tuple(
        _number(f"{name}[{i}]", v, lo=-math.inf, hi=math.inf, open_lo=True, open_hi=True)
        for i, v in enumerate(values)
    )


@dataclass(frozen=True)
class CalibrationSpec:
    """What is fixed before the calibration inputs are seen; every field is validated here.

    The fields are declared here once: :class:`Calibration` extends them, and its JSON codec and
    the manifest schema (:func:`record_fields`) are derived from them, so a new setting is one new
    field (with its check in ``__post_init__``).

    Parameters
    ----------
    sigma : float
        σ of the Gaussian noise, in [0,1]-pixel units of the model input (> 0).
    n_mc : int
        N_cal, the Monte Carlo draws per calibration input.
    alpha : float
        α in (0, 1): the conformal miss rate.
    beta : float
        β in (0, 1): the Clopper–Pearson miss rate of each MC lower bound.
    score : {"probit", "logit", "identity"}
        The monotone transform T of the conformal score.
    delta : float or None
        The PAC δ in (0, 1) (training-conditional coverage), or None for marginal coverage.
    bin_edges : tuple of float
        Inner edges on ŝ (strictly increasing, in (0, 1]) of Mondrian confidence bins.
    score_map_x, score_map_y : tuple of float
        Knots of a monotone map g on the probit scale (probit only); the score becomes
        g(Φ⁻¹(min(ŝ, p_cap))) − Φ⁻¹(p̲).
    score_scale_x, score_scale_y : tuple of float
        Knots of a positive scale u on the same axis (probit only); the score is divided by
        u(Φ⁻¹(min(ŝ, p_cap))), a normalized score.
    cap_draws : int or None
        N₂ > N_cal further draws for the calibration inputs whose N_cal draws all fell on one class
        (:func:`two_stage_lower`); the cap becomes β^(1/N₂).
    clip_at_abstention : bool
        Clip each score at its input's abstention threshold, min(e, (g(z) − T(½))/u(z))
        (:func:`rrise.scores.conformal_scores`): the same guarantee, a quantile never larger.
        False (the plain score) for a record that does not name it.

    Every choice here must come from data disjoint from the calibration inputs, or the guarantee
    of :func:`conformalize` is void.

    Raises
    ------
    ValueError
        Naming the field whose value is out of range or inconsistent.

    Examples
    --------
    >>> spec = CalibrationSpec(sigma=0.25, n_mc=10_000, alpha=0.01, beta=0.001)
    >>> round(spec.p_cap, 6), spec.bins
    (0.999309, 1)
    >>> CalibrationSpec(sigma=0.25, n_mc=100, alpha=1.5, beta=0.001)
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a finite number in (0, 1), got 1.5
    """

    sigma: float = field(metadata={_RECORD: "optional"})  # a manifest keeps σ in ``smoothing``
    n_mc: int
    alpha: float
    beta: float
    score: Literal[TRANSFORMS] = field(default="probit", metadata={_RECORD: "required"})
    delta: float | None = None
    bin_edges: tuple[float, ...] = ()
    score_map_x: tuple[float, ...] = ()
    score_map_y: tuple[float, ...] = ()
    score_scale_x: tuple[float, ...] = ()
    score_scale_y: tuple[float, ...] = ()
    cap_draws: int | None = None
    clip_at_abstention: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not isinstance(self.clip_at_abstention, bool):
            raise ValueError(f"clip_at_abstention must be true or false, got {self.clip_at_abstention!r}")
        put(self, "sigma", _number("sigma", self.sigma, lo=0.0, hi=math.inf, open_lo=True, open_hi=True))
        put(self, "n_mc", _count("n_mc", self.n_mc))
        put(self, "alpha", _probability("alpha", self.alpha))
        put(self, "beta", _probability("beta", self.beta))
        if self.delta is not None:
            put(self, "delta", _probability("delta", self.delta))
        if self.score not in TRANSFORMS:
            raise ValueError(f"unknown score transform {self.score!r}; expected one of {TRANSFORMS}")
        put(self, "bin_edges", _floats("bin_edges", self.bin_edges))
        if any(not 0.0 < e <= 1.0 for e in self.bin_edges):
            raise ValueError(f"bin edges must lie in (0, 1], got {self.bin_edges}")
        if any(b <= a for a, b in zip(self.bin_edges, self.bin_edges[1:])):
            raise ValueError(f"bin edges must increase strictly, got {self.bin_edges}")
        for name in ("score_map_x", "score_map_y", "score_scale_x", "score_scale_y"):
            put(self, name, _floats(name, getattr(self, name)))
        _check_score_map(self.score_map_x, self.score_map_y, self.score)
        _check_score_scale(self.score_scale_x, self.score_scale_y, self.score)
        if self.cap_draws is not None:
            put(self, "cap_draws", _count("cap_draws", self.cap_draws))
            if self.cap_draws <= self.n_mc:
                raise ValueError(f"cap_draws ({self.cap_draws}) must exceed n_mc ({self.n_mc})")

    @property
    def p_cap(self) -> float:
        """β^(1/N): the largest lower bound the calibration's draws can give (N = ``cap_draws`` when
        inputs at the first stage's cap get more draws, else N_cal)."""
        return p_cap(self.beta, self.cap_draws or self.n_mc)

    @property
    def score_map(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The knots ``(x, y)`` of the learned probit map, or None for the plain transform."""
        return (self.score_map_x, self.score_map_y) if self.score_map_x else None

    @property
    def score_scale(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The knots ``(x, u)`` of the learned positive scale, or None for an unnormalized score."""
        return (self.score_scale_x, self.score_scale_y) if self.score_scale_x else None

    @property
    def bins(self) -> int:
        """G, the number of confidence bins (1 without bin edges)."""
        return len(self.bin_edges) + 1

    @property
    def bin_delta(self) -> float | None:
        """The PAC δ of each confidence bin: δ/G, so that all G bins hold at once with prob. ≥ 1 − δ."""
        return None if self.delta is None else self.delta / self.bins

    def settings(self) -> dict[str, Any]:
        """This spec's fields by name (for a :class:`Calibration`, only the spec's own)."""
        return {f.name: getattr(self, f.name) for f in fields(CalibrationSpec)}


def _check_knots(what: str, x: tuple[float, ...], y: tuple[float, ...], score: str) -> bool:
    """The checks a learned score map and a score scale share; False when there are no knots."""
    if not x and not y:
        return False
    if score != "probit":
        raise ValueError(f"a learned {what} works on the probit scale only, not with score {score!r}")
    if len(x) != len(y) or len(x) < 1:
        raise ValueError(f"{what} needs as many x as y knots (≥ 1), got {len(x)} and {len(y)}")
    if any(b <= a for a, b in zip(x, x[1:])):
        raise ValueError(f"{what} x knots must increase strictly")
    return True


def _check_score_map(x: tuple[float, ...], y: tuple[float, ...], score: str) -> None:
    if _check_knots("score map", x, y, score) and any(b < a for a, b in zip(y, y[1:])):
        raise ValueError("score map y values must not decrease (the map must be monotone)")


def _check_score_scale(x: tuple[float, ...], y: tuple[float, ...], score: str) -> None:
    if _check_knots("score scale", x, y, score) and any(not v > 0.0 for v in y):
        raise ValueError(f"score scale values must be positive, got {min(y)!r}")


@dataclass(frozen=True, kw_only=True)
class Calibration(CalibrationSpec):
    """A conformal calibration: its spec's settings, the quantile(s) and what it was made from.

    Made by :func:`conformalize` (or read back by :meth:`from_dict`); read by the deployment rule
    :func:`rrise.certify_from_probs`. It holds every :class:`CalibrationSpec` field (its ``spec``)
    and adds what calibration found.

    Parameters
    ----------
    sigma, n_mc, alpha, beta, score, delta, bin_edges, score_map_x, score_map_y, score_scale_x, \
score_scale_y, cap_draws, clip_at_abstention
        The spec's settings (see :class:`CalibrationSpec`).
    quantile : float
        The single conformal quantile q̂ (+inf: every certificate abstains).
    m : int
        The number of calibration inputs.
    p_cap : float, optional
        β^(1/N), computed when not given; a given value must agree.
    bin_quantiles : tuple of float or None
        With confidence bins, one q̂ per bin (+inf or None: that bin always abstains); ``quantile``
        stays the plain single-quantile calibration, valid on its own.
    dataset : str or None
        The calibration data's name.
    base_sha256, surrogate_sha256 : str or None
        sha256 of the base model whose counts and of the surrogate whose probabilities were used.

    Raises
    ------
    ValueError
        Naming the field whose value is invalid.

    Examples
    --------
    >>> cal = Calibration(sigma=0.25, quantile=0.4, alpha=0.01, beta=0.001, n_mc=10_000, m=3000)
    >>> round(cal.max_radius(), 4)
    0.6996
    >>> Calibration.from_dict(cal.to_dict()) == cal
    True
    """

    quantile: float
    m: int
    p_cap: float = field(default=float("nan"), metadata={_RECORD: "required"})
    bin_quantiles: tuple[float | None, ...] = ()
    dataset: str | None = None
    base_sha256: str | None = None
    surrogate_sha256: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # validates σ, N, α, β, δ, score, edges, map and scale
        put = object.__setattr__
        put(self, "m", _count("m", self.m))
        q = self.quantile
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or math.isnan(q):
            raise ValueError(f"quantile must be a number, got {q!r}")
        put(self, "quantile", float(q))
        cap = p_cap(self.beta, self.cap_draws or self.n_mc)
        if isinstance(self.p_cap, float) and math.isnan(self.p_cap):
            put(self, "p_cap", cap)
        elif not math.isclose(
            _number("p_cap", self.p_cap, lo=0, hi=1, open_lo=True, open_hi=False), cap, rel_tol=1e-9
        ):
            raise ValueError(f"p_cap {self.p_cap} is not beta^(1/n_mc) = {cap}")
        self._check_bins()
        for name in ("base_sha256", "surrogate_sha256"):
            _check_sha(name, getattr(self, name))
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset):
            raise ValueError(f"dataset must be a non-empty name, got {self.dataset!r}")
        put(self, "_z_cap", norm_ppf(float(self.p_cap)))  # Φ⁻¹(p_cap), once for the per-frame path

    def _check_bins(self) -> None:
        values = tuple(math.inf if v is None else float(v) for v in self.bin_quantiles)
        object.__setattr__(self, "bin_quantiles", values)
        if (self.bin_edges or values) and len(values) != len(self.bin_edges) + 1:
            raise ValueError(
                f"{len(self.bin_edges)} bin edges need {len(self.bin_edges) + 1} bin quantiles, "
                f"got {len(values)}"
            )
        if any(math.isnan(v) for v in values):
            raise ValueError("bin quantiles must be numbers (null for an always-abstaining bin)")

    @property
    def spec(self) -> CalibrationSpec:
        """The settings this calibration was made with (everything but its quantiles)."""
        return CalibrationSpec(**self.settings())

    def quantiles_for(self, top_prob: np.ndarray) -> np.ndarray:
        """q̂ for each input: its confidence bin's quantile, or the single quantile."""
        s = np.asarray(top_prob, dtype=np.float64)
        if not self.bin_edges:
            return np.full(s.shape, self.quantile)
        return np.asarray(self.bin_quantiles)[confidence_bin(s, self.bin_edges)]

    def max_radius(self) -> float:
        """An upper bound on every radius this calibration can certify: σ·min(g_max − min q̂·u, Φ⁻¹(p_cap))
        with g_max = Φ⁻¹(p_cap) (or the score map's top knot) and u the scale's smallest knot (its
        largest when q̂ < 0; 1 without a scale); 0 when that is not positive."""
        q = min((self.quantile, *self.bin_quantiles)) if self.bin_quantiles else self.quantile
        g_max = max(self.score_map_y) if self.score_map is not None else self._z_cap
        u = (min(self.score_scale_y) if q >= 0 else max(self.score_scale_y)) if self.score_scale else 1.0
        z = min(g_max - q * u, self._z_cap)
        return self.sigma * z if z > 0 else 0.0

    def recalibrate(
        self,
        probs: np.ndarray,
        counts: np.ndarray,
        *,
        cap_counts: np.ndarray | None = None,
        surrogate_sha256: str | None = None,
    ) -> Calibration:
        """This calibration's spec applied to other numerics (a precision variant's ``probs`` on the
        same calibration inputs, with their full MC ``counts`` and, with ``cap_draws``, their
        second-stage ``cap_counts``): see :func:`conformalize`."""
        return conformalize(
            self.spec,
            probs,
            counts,
            cap_counts=cap_counts,
            dataset=self.dataset,
            base_sha256=self.base_sha256,
            surrogate_sha256=surrogate_sha256,
        )

    def with_quantile(self, quantile: float, bin_quantiles: tuple[float, ...] | None = None) -> Calibration:
        """The same calibration with another variant's quantile(s)."""
        extra = {} if bin_quantiles is None else {"bin_quantiles": tuple(bin_quantiles)}
        return replace(self, quantile=float(quantile), **extra)

    # --- the one codec, derived from the fields ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (``calibration.json`` and the manifest's ``calibration``): every
        required key, and each optional one (δ, bins, score map and scale, provenance) only when set;
        an infinite quantile is null."""
        record: dict[str, Any] = {}
        for name, _, required in record_fields():
            value = getattr(self, name)
            if required or (value not in (None, ()) and value is not False):
                record[name] = _json_value(value)
        return record

    @classmethod
    def from_dict(cls, d: Any, *, sigma: float | None = None) -> Calibration:
        """Read a record written by :meth:`to_dict` (or a manifest's ``calibration``, with ``sigma``
        from its ``smoothing``). Raises ValueError naming the missing or invalid key."""
        if not isinstance(d, dict):
            raise ValueError(f"a calibration record must be an object, got {type(d).__name__}")
        d = dict(d)
        if sigma is not None:
            if "sigma" in d and d["sigma"] != sigma:
                raise ValueError(f"calibration sigma {d['sigma']} disagrees with smoothing sigma {sigma}")
            d["sigma"] = sigma
        table = record_fields()
        missing = [name for name, _, required in table if (required or name == "sigma") and name not in d]
        if missing:
            raise ValueError(f"calibration record lacks {', '.join(missing)}")
        kwargs = {}
        for name, kind, _ in table:
            if name in d:
                kwargs[name] = _from_json(name, d[name], kind)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid calibration record: {exc}") from None


def record_fields() -> list[tuple[str, Any, bool]]:
    """The calibration record's keys, derived from :class:`Calibration`'s fields: ``(name, type,
    required)`` with the field's type as written (``tuple[X, ...]`` for lists) and whether a record
    must hold it (no default, or marked so). The JSON codec and the manifest schema both read this.

    >>> [name for name, _, required in record_fields() if required]
    ['n_mc', 'alpha', 'beta', 'score', 'quantile', 'm', 'p_cap']
    """
    hints = typing.get_type_hints(Calibration)
    return [(f.name, hints[f.name], _required(f)) for f in fields(Calibration)]


def _required(f: Field) -> bool:
    mark = f.metadata.get(_RECORD)
    if mark is not None:
        return mark == "required"
    return f.default is MISSING and f.default_factory is MISSING


def _json_value(value: Any) -> Any:
    """A field value as JSON holds it: tuples as lists, an infinite number as null."""
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _from_json(name: str, value: Any, kind: Any) -> Any:
    """A record value as the field takes it: lists as tuples; null for a quantile means +inf."""
    if typing.get_origin(kind) is tuple:
        if value is not None and not isinstance(value, list | tuple):
            raise ValueError(f"calibration {name} must be a list, got {value!r}")
        return tuple(value or ())
    if value is None and kind is float:
        return math.inf  # JSON has no infinity: an always-abstaining quantile is null
    return value


def _check_sha(name: str, value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, str) and len(value) == _SHA256_LEN and all(c in "0123456789abcdef" for c in value)
    if not ok:
        raise ValueError(f"{name} must be a sha256 hex digest, got {value!r}")


def mc_lower_bounds(
    counts: np.ndarray,
    classes: np.ndarray,
    n_mc: int,
    beta: float,
    *,
    cap_counts: np.ndarray | None = None,
    cap_draws: int | None = None,
) -> np.ndarray:
    """One-sided (1−β) Clopper–Pearson lower bounds on ``p_{classes[i]}(x_i)`` from ``[m, K]`` counts;
    with ``cap_counts`` (``[m, K]``, ``cap_draws`` fresh draws on the rows whose ``n_mc`` draws all
    fell on one class), the two-stage bound :func:`two_stage_lower`.

    Guarantee: for each i, if ``counts[i]`` (and ``cap_counts[i]``) come from fresh draws independent
    of each other and of the choice of ``classes[i]``, then ``P(bound_i ≤ p_{classes[i]}(x_i)) ≥ 1 − β``.
    The bound is 0 at count 0.
    """
    c = np.asarray(counts)
    cls = np.asarray(classes, dtype=np.int64)
    if c.ndim != 2 or cls.shape != (len(c),):
        raise ValueError(f"counts must be [m, K] and classes [m]; got {c.shape} and {cls.shape}")
    if np.any((cls < 0) | (cls >= c.shape[1])):
        raise ValueError(f"classes must lie in [0, {c.shape[1]})")
    rows = np.arange(len(c))
    k = c[rows, cls]
    if cap_counts is None:
        return np.atleast_1d(np.asarray(clopper_pearson_lower(k, int(n_mc), beta), dtype=np.float64))
    if cap_draws is None:
        raise ValueError("cap_counts need cap_draws, the number of second-stage draws")
    k2 = np.asarray(cap_counts)[rows, cls]
    return two_stage_lower(k, int(n_mc), k2, int(cap_draws), beta)


def two_stage_lower(k1: np.ndarray, n1: int, k2: np.ndarray, n2: int, beta: float) -> np.ndarray:
    """Per input: ``clopper_pearson_lower(k1, n1, β)`` when some of the ``n1`` first draws missed
    ``Â`` (``k1 < n1``), else ``clopper_pearson_lower(k2, n2, β)`` from ``n2`` fresh draws alone
    (``k2`` is read only where ``k1 == n1``).

    Guarantee: for ``k1 ~ Binomial(n1, p)`` and, independently, ``k2 ~ Binomial(n2, p)``,
    ``P(two_stage_lower > p) ≤ β`` for every ``p`` (docs/CERTIFICATE.md, "More draws at the cap").
    The largest value it can give is ``β^(1/n2)``.
    """
    k1, k2 = np.asarray(k1), np.asarray(k2)
    if np.any((k1 < 0) | (k1 > n1)) or np.any((k2 < 0) | (k2 > n2)):
        raise ValueError(f"counts must lie in [0, n]: k1 in [0, {n1}], k2 in [0, {n2}]")
    first = np.atleast_1d(clopper_pearson_lower(k1, n1, beta))
    second = np.atleast_1d(clopper_pearson_lower(np.where(k1 == n1, k2, 0), n2, beta))
    return np.where(k1 == n1, second, first).astype(np.float64)


def _check_cap_counts(counts: np.ndarray, cap_counts: Any, spec: CalibrationSpec) -> np.ndarray | None:
    """``cap_counts`` checked against ``spec.cap_draws``: present exactly when the spec asks for it,
    ``[m, K]``, summing to ``cap_draws`` on every row whose first-stage draws all fell on one class
    and zero elsewhere."""
    if spec.cap_draws is None:
        if cap_counts is not None:
            raise ValueError("cap_counts were given but the spec has no cap_draws")
        return None
    if cap_counts is None:
        raise ValueError(f"the spec asks for {spec.cap_draws} draws at the cap: pass cap_counts")
    k2 = np.asarray(cap_counts)
    if k2.shape != counts.shape or not np.issubdtype(k2.dtype, np.integer):
        raise ValueError(
            f"cap_counts must be integer [m, K] = {list(counts.shape)}, got {k2.dtype} {list(k2.shape)}"
        )
    at_cap = counts.max(axis=1) == spec.n_mc
    want = np.where(at_cap, spec.cap_draws, 0)
    bad = np.flatnonzero((k2.sum(axis=1) != want) | (k2.min(axis=1, initial=0) < 0))
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"cap_counts row {i} sums to {int(k2[i].sum())}, expected {int(want[i])}: rows whose "
            f"n_mc={spec.n_mc} draws all fell on one class hold cap_draws={spec.cap_draws} draws, "
            f"the others none ({bad.size} such row(s))"
        )
    return k2


def _check_inputs(probs: np.ndarray, counts: np.ndarray, n_mc: int) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    k = np.asarray(counts)
    if p.ndim != 2 or k.shape != p.shape:
        raise ValueError(f"probs and counts must both be [m, K]; got {p.shape} and {k.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    if p.size and (p.min() < 0 or p.max() > 1 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3)):
        raise ValueError("probs must be probabilities (rows of a softmax), not logits")
    if not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {k.dtype}")
    bad = np.flatnonzero((k.sum(axis=1) != n_mc) | (k.min(axis=1, initial=0) < 0))
    if bad.size:
        row = k[bad[0]]
        raise ValueError(
            f"counts row {bad[0]} sums to {int(row.sum())} with min {int(row.min())}; every row must be "
            f"non-negative and sum to n_mc={n_mc} ({bad.size} such row(s))"
        )
    return p, k


def _quantiles(spec: CalibrationSpec, p: np.ndarray, k: np.ndarray, k2: np.ndarray | None):
    """``(q̂, per-bin q̂)`` of checked probabilities ``p`` and counts ``k`` (and ``k2`` at the cap)."""
    top = np.argmax(p, axis=1)
    top_prob = p[np.arange(len(p)), top]
    p_low = mc_lower_bounds(k, top, spec.n_mc, spec.beta, cap_counts=k2, cap_draws=spec.cap_draws)
    scores = conformal_scores(
        top_prob, p_low, spec.p_cap, spec.score, spec.score_map, spec.score_scale, spec.clip_at_abstention
    )
    quantile = conformal_quantile(scores, spec.alpha, spec.delta)
    if not spec.bin_edges:
        return quantile, ()
    return quantile, mondrian_quantiles(scores, top_prob, spec.bin_edges, spec.alpha, spec.bin_delta)


def conformalize(
    spec: CalibrationSpec,
    probs: np.ndarray,
    counts: np.ndarray,
    *,
    cap_counts: np.ndarray | None = None,
    dataset: str | None = None,
    base_sha256: str | None = None,
    surrogate_sha256: str | None = None,
) -> Calibration:
    """Split-conformal calibration of the surrogate's radii on ``m`` calibration inputs.

    Per input: Â = argmax probs, p̲ = the (1−β) Clopper–Pearson bound on p_Â from its counts (two-stage
    with ``cap_counts``), score e = (g(z) − T(p̲))/u(z), z = T(min(ŝ, p_cap)) (``clip_at_abstention``:
    min(e, (g(z) − T(½))/u(z))); q̂: the :func:`conformal_rank` (m, α, δ)-th smallest (per bin at δ/G).

    Guarantee: if the calibration inputs served nothing else (base model, surrogate, ``spec``) and
    are exchangeable with a deployed input, then with probability ≥ 1 − α − β over calibration,
    input and noise, :func:`rrise.certify_from_probs` with the result abstains or the smoothed
    classifier predicts Â and is constant on the ℓ2 ball of its radius: marginal over inputs (with
    bins, also within each). With ``delta``, with probability ≥ 1 − δ over the calibration draw it
    holds for every later input (in every bin at once), and marginally whatever δ.

    Parameters
    ----------
    spec : CalibrationSpec
        Everything fixed before the calibration inputs were seen.
    probs, counts : numpy.ndarray
        [m, K]: the surrogate's probabilities, from the deployed numerics, and fresh MC class
        counts of the base classifier, ``spec.n_mc`` per row.
    cap_counts : numpy.ndarray or None
        [m, K] second-stage draws at the cap, exactly when ``spec.cap_draws`` is set.
    dataset, base_sha256, surrogate_sha256 : str or None
        Provenance: the data's name, the sha256 of the models the counts and probabilities came from.

    Returns
    -------
    Calibration
        The spec's settings with the quantile(s), ``m`` and the provenance.

    Raises
    ------
    ValueError
        Too few inputs (naming the smallest m), or arrays that are not what the spec says.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> probs = rng.dirichlet([5, 1, 1], size=500)
    >>> counts = np.stack([rng.multinomial(1000, p) for p in probs])
    >>> cal = conformalize(CalibrationSpec(sigma=0.25, n_mc=1000, alpha=0.05, beta=0.001), probs, counts)
    >>> cal.m, round(cal.quantile, 4)
    (500, 0.2288)
    """
    if not isinstance(spec, CalibrationSpec):
        raise TypeError(f"spec must be a CalibrationSpec, got {type(spec).__name__}")
    p, k = _check_inputs(probs, counts, spec.n_mc)
    quantile, bins = _quantiles(spec, p, k, _check_cap_counts(k, cap_counts, spec))
    provenance = {"dataset": dataset, "base_sha256": base_sha256, "surrogate_sha256": surrogate_sha256}
    return Calibration(**spec.settings(), quantile=quantile, m=len(p), bin_quantiles=bins, **provenance)


def _rank(m: int, alpha: float) -> int:
    """⌈(m+1)(1−α)⌉ in exact rational arithmetic (α read as the decimal it was written as)."""
    return math.ceil((m + 1) * (1 - Fraction(repr(float(alpha)))))


def conformal_rank(m: int, alpha: float, delta: float | None = None) -> int:
    """The rank k (1-based) of the order statistic that serves as q̂ among m scores.

    ``delta=None``: ⌈(m+1)(1−α)⌉, the split-conformal rank (marginal: P(e ≤ q̂) ≥ 1 − α).
    ``delta`` given: the larger of that rank and the training-conditional (PAC) rank, the smallest k
    with P(Binomial(m, 1−α) ≥ k) ≤ δ: with probability ≥ 1 − δ over the calibration draw,
    P(e ≤ q̂ | calibration) ≥ 1 − α, and marginally P(e ≤ q̂) ≥ 1 − α still holds. (For a large δ
    the PAC rank alone falls below the marginal one: m = 3000, α = 0.01, δ = 0.9 would give a
    marginal coverage of 0.9877 < 0.99.)

    Parameters
    ----------
    m : int
        The number of calibration scores.
    alpha : float
        α in (0, 1).
    delta : float or None
        The PAC δ in (0, 1), or None.

    Returns
    -------
    int
        k, which may exceed m (then no quantile exists: see :func:`min_calibration_size`).

    Examples
    --------
    >>> conformal_rank(3000, 0.01)
    2971
    >>> conformal_rank(3000, 0.01, delta=0.1) > 2971
    True
    >>> conformal_rank(3000, 0.01, delta=0.9)  # never below the marginal rank
    2971
    """
    _probability("alpha", alpha)
    marginal = _rank(m, alpha)
    if delta is None:
        return marginal
    _probability("delta", delta)
    from scipy.stats import binom  # lazy: only the PAC rank needs it

    return max(marginal, int(binom.ppf(1.0 - delta, m, 1.0 - alpha)) + 1)


def min_calibration_size(alpha: float, delta: float | None = None, bins: int = 1) -> int:
    """The fewest calibration inputs that give a quantile: the smallest m with
    :func:`conformal_rank` (m, α, δ) ≤ m, times ``bins`` when each of that many confidence bins needs
    its own (each at δ/G, as :func:`conformalize` takes it). No scipy: the marginal rank fits
    exactly when ⌈(m+1)(1−α)⌉ ≤ m, and the PAC rank when P(Binomial(m, 1 − α) = m) = (1 − α)^m ≤ δ.

    Parameters
    ----------
    alpha : float
        α in (0, 1).
    delta : float or None
        The PAC δ in (0, 1) over all bins, or None.
    bins : int
        G, the number of confidence bins.

    Returns
    -------
    int
        The smallest total m.

    Raises
    ------
    ValueError
        When α or δ is not in (0, 1) or ``bins`` < 1.

    Examples
    --------
    >>> min_calibration_size(0.01), min_calibration_size(0.001)
    (99, 999)
    >>> min_calibration_size(0.01, delta=0.1)
    230
    >>> min_calibration_size(0.01, delta=0.9)  # never below the marginal size
    99
    """
    _probability("alpha", alpha)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    m = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while _rank(m, alpha) > m:
        m += 1
    if delta is not None:
        per_bin = _probability("delta", delta) / bins
        pac = max(1, math.ceil(math.log(per_bin) / math.log1p(-alpha)) - 1)
        while (1.0 - alpha) ** pac > per_bin:
            pac += 1
        m = max(m, pac)
    return bins * m


def conformal_quantile(scores: np.ndarray, alpha: float, delta: float | None = None) -> float:
    """q̂: the k-th smallest of m scores, k = :func:`conformal_rank` (m, α, δ).

    Guarantee (δ = None): for a new exchangeable score e, P(e ≤ q̂) ≥ 1 − α. With δ: with
    probability ≥ 1 − δ over the calibration scores, P(e ≤ q̂ | calibration) ≥ 1 − α. Raises
    ValueError naming the smallest m that works when k > m.
    """
    e = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    m = len(e)
    k = conformal_rank(m, alpha, delta)
    if k > m:
        what = f"alpha={alpha}" + ("" if delta is None else f", delta={delta:g}")
        raise ValueError(
            f"{m} calibration inputs are too few for {what}: "
            f"need at least m={min_calibration_size(alpha, delta)}"
        )
    return float(e[k - 1])


def mondrian_quantiles(
    scores: np.ndarray,
    top_prob: np.ndarray,
    edges: tuple[float, ...] | list[float],
    alpha: float,
    delta: float | None = None,
) -> tuple[float, ...]:
    """One conformal quantile per confidence bin (Mondrian split conformal), each at ``delta``.

    Guarantee: if the edges were fixed without looking at the calibration inputs, then for a new
    exchangeable input whose ŝ falls in bin g, P(e ≤ q̂_g) ≥ 1 − α; so also marginally. With a PAC
    ``delta`` per bin, all G bins hold at once with probability ≥ 1 − G·delta (pass δ/G for 1 − δ,
    as :func:`conformalize` does). Each bin must hold :func:`min_calibration_size` inputs: a
    ValueError names the bin that does not.
    """
    e = np.asarray(scores, dtype=np.float64)
    which = confidence_bin(np.asarray(top_prob, dtype=np.float64), edges)
    bounds = [0.0, *edges, 1.0]
    need = min_calibration_size(alpha, delta)
    out = []
    for g in range(len(edges) + 1):
        in_bin = e[which == g]
        if len(in_bin) < need:
            raise ValueError(
                f"confidence bin {g} (ŝ in [{bounds[g]:.6g}, {bounds[g + 1]:.6g})) holds {len(in_bin)} "
                f"calibration inputs; alpha={alpha} needs at least {need} per bin: use fewer bins "
                "or more calibration inputs"
            )
        out.append(conformal_quantile(in_bin, alpha, delta))
    return tuple(out)
