"""More draws at the Monte Carlo cap: the two-stage lower bound behind lever 3 of the calibration.

With ``N_cal`` draws no lower bound can exceed ``β^(1/N_cal)``, so every calibration input whose draws
all vote for ``Â`` scores as if its ``p`` were at most that, and no radius passes
``σ·Φ⁻¹(β^(1/N_cal))``. Spending ``n2`` further draws only on those inputs lifts the cap to
``β^(1/n2)`` at a fraction of the cost of ``n2`` draws everywhere. docs/CERTIFICATE.md has the proof
that the bound stays valid at level β; :func:`rrise.calibration.two_stage_lower` is the bound (used
by ``conformalize`` with ``cap_draws``) and :func:`two_stage_miss_probability` its exact miss
probability, for checks.
"""

from __future__ import annotations

import numpy as np

from rrise.calibration import two_stage_lower
from rrise.stats import clopper_pearson_lower

__all__ = ["two_stage_lower", "two_stage_miss_probability"]


def two_stage_miss_probability(p: float, n1: int, n2: int, beta: float) -> float:
    """Exactly ``P(two_stage_lower(k1, n1, k2, n2, β) > p)`` for a true frequency ``p`` (a sum over
    both binomials): the quantity the guarantee bounds by β."""
    from scipy.stats import binom

    k1 = np.arange(n1 + 1)
    over1 = np.atleast_1d(clopper_pearson_lower(k1, n1, beta)) > p
    stage1 = float(np.sum(binom.pmf(k1[:-1], n1, p) * over1[:-1]))  # k1 < n1: the first bound
    k2 = np.arange(n2 + 1)
    over2 = np.atleast_1d(clopper_pearson_lower(k2, n2, beta)) > p
    return stage1 + float(binom.pmf(n1, n1, p)) * float(np.sum(binom.pmf(k2, n2, p) * over2))
