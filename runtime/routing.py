"""Adaptive certification of a batch of frames: which frames get base-model draws, and the
certificate each frame ends with (docs/CERTIFICATE.md, "Adaptive certification").

:class:`Routing` says which frames get draws: with ``--require-radius R`` those whose surrogate
radius ``R_s`` (0 when it abstains) is below ``R``, their draws stopping once ``R`` is certified or
shown out of reach; without it, the bundle's routing rule (manifest ``adaptive.routing``, chosen on
the selection split): ``R_s < target_radius`` and ``ŝ < score_below``. :class:`AdaptiveCertifier`
spends the draws (:class:`~rrise.runtime.adaptive.McCertifier`, on the preprocessed model input the
surrogate saw) within one deadline shared by the whole batch, and keeps the larger of the two
certificates, always for the surrogate's class ``Â``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rrise.certificate import Certificate
from rrise.sequential import batch_schedule

from .adaptive import McCertifier, McResult

__all__ = ["AdaptiveCertifier", "Judged", "Routing"]

BY_SURROGATE, BY_MC = "surrogate", "mc"


@dataclass(frozen=True)
class Routing:
    """Which frames get draws: those whose surrogate radius is below ``target_radius`` and whose
    ŝ is below ``score_below`` (``inf``: no ŝ condition); their draws aim at ``target_radius``
    (and with ``step_down``, once it is out of reach, at half of it, then at any radius).
    ``origin`` says where the rule came from (``--require-radius`` or the bundle).

    >>> from rrise.certificate import Certificate
    >>> rule = Routing.of_bundle({"adaptive": {"routing": {"score_below": 0.9, "target_radius": 0.5}}}, None)
    >>> short = Certificate(top_class=1, abstain=False, radius=0.2, score=0.8, p_lower=0.79)
    >>> abstained = Certificate(top_class=1, abstain=True, radius=0.0, score=0.95, p_lower=0.4)
    >>> rule.routes(short), rule.routes(abstained), Routing(0.3).routes(abstained)
    (True, False, True)
    """

    target_radius: float
    score_below: float = math.inf
    origin: str = "--require-radius"
    step_down: bool = False

    def routes(self, cert: Certificate) -> bool:
        """Whether ``cert``'s frame gets draws (its radius is 0 when it abstains)."""
        radius = 0.0 if cert.abstain else float(cert.radius)
        return radius < self.target_radius and float(cert.score) < self.score_below

    @classmethod
    def of_bundle(cls, manifest: Mapping[str, Any], require_radius: float | None) -> Routing:
        """``--require-radius`` when given, else the manifest's ``adaptive.routing``; ValueError
        naming ``--require-radius`` when there is neither."""
        if require_radius is not None:
            return cls(target_radius=float(require_radius))
        rule = (manifest.get("adaptive") or {}).get("routing")
        if not rule:
            raise ValueError(
                "--mc-budget needs --require-radius R: this bundle states no routing rule "
                "(manifest adaptive.routing) saying which frames get draws"
            )
        score = rule.get("score_below")
        return cls(
            target_radius=float(rule["target_radius"]),
            score_below=math.inf if score is None else float(score),
            origin="bundle adaptive.routing",
            step_down=rule.get("step_down") is True,
        )


class Judged:
    """One frame's outcome: the ``certificate`` the record carries, who gave it (``certified_by``:
    ``"surrogate"``, ``"mc"`` or None when it abstains) and the draws spent (``mc_draws``)."""

    __slots__ = ("certificate", "certified_by", "mc_draws", "mc")

    def __init__(self, certificate: Certificate, certified_by: str | None, mc: McResult | None) -> None:
        self.certificate = certificate
        self.certified_by = certified_by
        self.mc = mc
        self.mc_draws = 0 if mc is None else int(mc.draws)


class AdaptiveCertifier:
    """The surrogate's certificates, improved by Monte Carlo where ``routing`` says, within the
    certifier's budget per frame and its deadline per call of :meth:`judge` (a batch of frames
    together never takes longer than the deadline plus one batch of draws).

    >>> from rrise.certificate import Certificate
    >>> from rrise.sequential import SequentialOptions
    >>> votes = lambda x: np.ones(len(x), dtype=np.int64)  # a base model that always says class 1
    >>> mc = McCertifier(votes, 0.25, SequentialOptions(budget=1024, batch_size=256), seed=0)
    >>> adaptive = AdaptiveCertifier(mc, Routing(0.3))
    >>> abstained = Certificate(top_class=1, abstain=True, radius=0.0, score=0.6, p_lower=0.4)
    >>> [judged] = adaptive.judge([np.zeros((1, 4, 4), np.float32)], [abstained])
    >>> judged.certified_by, judged.certificate.pred, judged.mc_draws, judged.certificate.radius >= 0.3
    ('mc', 1, 64, True)
    """

    def __init__(self, mc: McCertifier, routing: Routing) -> None:
        self.mc = mc
        self.routing = routing
        self._slowest_draw_s = (
            0.0  # the slowest rate per draw seen: a frame starts only if its first batch fits
        )
        self._first_batch = batch_schedule(mc.options)[0]

    @property
    def deadline_ms(self) -> float | None:
        return self.mc.options.deadline_ms

    def judge(
        self, inputs: Sequence[np.ndarray | None], certs: Sequence[Certificate | None]
    ) -> list[Judged | None]:
        """One :class:`Judged` per frame with a certificate (None for the others), in order;
        ``inputs`` are the preprocessed model inputs the surrogate saw."""
        clock = self.mc.clock
        start = clock()
        deadline = self.deadline_ms
        out: list[Judged | None] = []
        for x, cert in zip(inputs, certs, strict=True):
            if cert is None:
                out.append(None)
                continue
            left_ms = None if deadline is None else deadline - 1000.0 * (clock() - start)
            if not self.routing.routes(cert) or (
                left_ms is not None and left_ms <= 1000.0 * self._slowest_draw_s * self._first_batch
            ):
                out.append(_judged(cert, None))
                continue
            result = self.mc.certify(
                x,
                cert.top_class,
                self.routing.target_radius,
                deadline_ms=left_ms,
                step_down=self.routing.step_down,
            )
            if result.draws:
                self._slowest_draw_s = max(self._slowest_draw_s, result.elapsed_ms / 1000.0 / result.draws)
            out.append(_judged(cert, result))
        return out


def _judged(cert: Certificate, mc: McResult | None) -> Judged:
    """The larger certificate, for ``Â`` only: MC's when its radius beats the surrogate's (the
    record then abstains no more and carries MC's lower bound; ŝ stays the surrogate's)."""
    if mc is not None and mc.top_class != cert.top_class:
        raise ValueError(f"Monte Carlo certified class {mc.top_class}, not the surrogate's {cert.top_class}")
    surrogate_radius = 0.0 if cert.abstain else float(cert.radius)
    if mc is not None and mc.certified and mc.radius > surrogate_radius:
        by_mc = Certificate(
            top_class=cert.top_class, abstain=False, radius=mc.radius, score=cert.score, p_lower=mc.p_lower
        )
        return Judged(by_mc, BY_MC, mc)
    return Judged(cert, None if cert.abstain else BY_SURROGATE, mc)
