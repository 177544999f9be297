"""Monte Carlo certification of one frame with the bundle's base model, for the frames whose surrogate
radius falls short (docs/CERTIFICATE.md, "Adaptive certification").

:class:`McCertifier` adds ``N(0, σ²)`` noise (numpy) to the preprocessed model input, exactly as
calibration did, runs the base classifier in batches, counts the votes for the surrogate's class
``Â`` and stops by :func:`rrise.sequential.sequential_test`: on success, futility, the budget or
the deadline. The class was picked by the surrogate before any draw, so no selection draws are
needed, and the anytime-valid bound keeps its level ``α`` whatever stops the draws. Torch-free:
the base model runs under onnxruntime from the bundle's own bytes, checked against the manifest
digest before the session opens; any other backend plugs in as a ``classify`` callable.

Wiring it into a runtime takes a few lines::

    options = SequentialOptions(budget=mc_budget, deadline_ms=mc_deadline_ms, alpha=mc_alpha)
    if require_radius is not None:
        check_required_radius(require_radius, bundle.sigma, options)  # a one-line error if unreachable
    mc = McCertifier.from_bundle(bundle, options)
    ...
    if require_radius is not None and cert.radius < require_radius:
        result = mc.certify(model_input, cert.top_class, require_radius)
        radius = max(cert.radius, result.radius)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rrise.bundle import Bundle, BundleError
from rrise.onnx_session import FASTEST, open_session
from rrise.sequential import (
    SequentialOptions,
    radius_from_lower_bound,
    required_probability,
    sequential_test,
)

__all__ = ["BaseClassifier", "McCertifier", "McResult", "read_base_model"]


def read_base_model(bundle: Bundle) -> bytes:
    """The bytes of the bundle's ``base_model`` file, checked against its sha256 in the manifest
    (both ``base_model.sha256`` and ``files``) after they were read, so the session opens exactly
    the bytes that were checked. Raises BundleError naming the file."""
    entry = bundle.manifest.get("base_model")
    if not isinstance(entry, dict) or not entry.get("file"):
        raise BundleError(f"bundle {bundle.path} names no base_model: Monte Carlo certification needs one")
    name = entry["file"]
    listed = bundle.manifest.get("files", {}).get(name)
    expected = {d for d in (entry.get("sha256"), listed) if d is not None}
    if listed is None or len(expected) != 1:
        raise BundleError(f"bundle {bundle.path}: base_model {name} has no single sha256 in the manifest")
    try:
        data = bundle.file(name).read_bytes()
    except OSError as exc:
        raise BundleError(f"bundle {bundle.path}: cannot read base_model {name}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != listed:
        raise BundleError(f"bundle {bundle.path}: changed file {name} (sha256 differs from the manifest)")
    return data


class BaseClassifier:
    """The base model under onnxruntime: ``[B, C, H, W]`` float32 → ``[B]`` predicted classes, −1
    for a row whose output is not finite (a vote for no class). ``model``: a path or ONNX bytes;
    ``providers``: a :func:`rrise.onnx_session.open_session` choice (the fastest by default: Monte
    Carlo certifies the base model, whose numerics no quantile depends on)."""

    def __init__(self, model: str | bytes, providers: str = FASTEST, threads: int | None = None) -> None:
        self.session = open_session(model, providers, threads=threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"the base model must have one input, it has {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape[1:])
        self.dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(self.dtype, copy=False)
        step = self.fixed_batch
        if step is None:
            return self._votes(x)
        parts = []
        for start in range(0, len(x), step):  # a static batch dimension: pad the tail
            part = x[start : start + step]
            pad = step - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            parts.append(self._votes(part)[: step - pad])
        return np.concatenate(parts)

    def _votes(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: x})[0]
        if out.ndim != 2 or len(out) != len(x):
            raise ValueError(f"the base model must output [B, K], got shape {out.shape}")
        votes = out.argmax(axis=1).astype(np.int64)
        votes[~np.isfinite(out).all(axis=1)] = -1
        return votes


@dataclass(frozen=True)
class McResult:
    """One frame's Monte Carlo certificate for ``top_class``: the anytime-valid lower bound
    ``p_lower`` on ``P(f(x+ε) = top_class)`` at level ``alpha``, the radius ``σ·Φ⁻¹(p_lower)`` (0
    when ``p_lower ≤ 1/2``), the draws spent (``successes`` of them votes for ``top_class``), why
    the draws stopped (``stop``: ``success``, ``futility``, ``budget`` or ``deadline``) and how
    long they took."""

    top_class: int
    p_lower: float
    radius: float
    draws: int
    successes: int
    stop: str
    alpha: float
    elapsed_ms: float

    @property
    def certified(self) -> bool:
        return self.radius > 0.0


class McCertifier:
    """Certify frames by Monte Carlo with ``classify`` (``[B, C, H, W]`` → ``[B]`` classes), noise
    ``N(0, σ²)`` from one numpy generator (``seed``), within ``options`` (budget, deadline, α,
    batch size). ``clock`` (seconds) times the deadline; tests inject one. Not thread-safe: the
    caller serializes calls, as the Runtime serializes inference."""

    def __init__(
        self,
        classify: Callable[[np.ndarray], np.ndarray],
        sigma: float,
        options: SequentialOptions,
        *,
        num_classes: int | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.classify = classify
        self.sigma = float(sigma)
        self.options = options
        self.num_classes = num_classes
        self._rng = np.random.default_rng(seed)
        self._clock = clock

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        options: SequentialOptions,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        threads: int | None = None,
    ) -> McCertifier:
        """The bundle's base model (its bytes checked against the manifest) at the bundle's σ."""
        classify = BaseClassifier(read_base_model(bundle), threads=threads)
        return cls(classify, bundle.sigma, options, num_classes=bundle.num_classes, seed=seed, clock=clock)

    def certify(self, x: np.ndarray, top_class: int, require_radius: float | None = None) -> McResult:
        """Spend draws on ``x`` (the preprocessed model input ``[C, H, W]``, float32 in [0, 1]) for
        ``top_class``; with ``require_radius``, stop as soon as the bound certifies it (or cannot
        within the budget); without, spend the budget or run to the deadline."""
        x = self._check_input(x)
        top_class = self._check_class(top_class)
        required = None if require_radius is None else required_probability(require_radius, self.sigma)

        def draw_batch(m: int) -> int:
            noisy = self._rng.standard_normal((m, *x.shape), dtype=np.float32)
            noisy *= np.float32(self.sigma)
            noisy += x
            return int(np.count_nonzero(np.asarray(self.classify(noisy)) == top_class))

        r = sequential_test(draw_batch, required, self.options, clock=self._clock)
        return McResult(
            top_class=top_class,
            p_lower=r.lower_bound,
            radius=radius_from_lower_bound(r.lower_bound, self.sigma),
            draws=r.draws,
            successes=r.successes,
            stop=r.stop,
            alpha=r.alpha,
            elapsed_ms=1000.0 * r.elapsed_s,
        )

    def _check_input(self, x: Any) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise ValueError(
                f"Monte Carlo certification takes one model input [C, H, W], got shape {x.shape}"
            )
        expected = getattr(self.classify, "input_shape", None)
        if expected is not None and (
            len(expected) != x.ndim
            or any(isinstance(e, int) and e != g for e, g in zip(expected, x.shape, strict=True))
        ):
            raise ValueError(
                f"the base model expects input [B, {', '.join(map(str, expected))}], got {x.shape}"
            )
        if not np.isfinite(x).all():
            raise ValueError("the model input has NaN or infinite values")
        return x

    def _check_class(self, top_class: Any) -> int:
        c = int(top_class)
        if c != top_class or c < 0 or (self.num_classes is not None and c >= self.num_classes):
            bound = f" below {self.num_classes}" if self.num_classes is not None else ""
            raise ValueError(f"the class to certify must be a non-negative index{bound}, got {top_class!r}")
        return c
