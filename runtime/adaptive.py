"""Monte Carlo certification of one frame with the bundle's base model, for the frames whose surrogate
radius falls short (docs/CERTIFICATE.md, "Adaptive certification").

:class:`McCertifier` adds ``N(0, σ²)`` noise (numpy) to the preprocessed model input, exactly as
calibration did, runs the base classifier in batches, counts the votes for the surrogate's class
``Â`` and stops by :func:`rrise.sequential.sequential_test`: on success, futility, the budget or
the deadline. The class was picked by the surrogate before any draw, so no selection draws are
needed, and the anytime-valid bound keeps its level ``α`` whatever stops the draws. Torch-free:
the base model runs on the runtime's own backend from the bundle's own bytes, checked against the
manifest digest before the model opens: under onnxruntime (:class:`BaseClassifier`), or, with
``--backend tensorrt`` (or ``auto`` where one fits), on the bundle's TensorRT engine of the base model
built for this GPU and TensorRT version (``base_model.engines``, :class:`EngineClassifier`;
:func:`base_engine` picks it or refuses by name). Any other runner plugs in as a ``classify`` callable.

The runtime wires it in through :mod:`rrise.runtime.routing` (:class:`McOptions` is the typed
option group whose fields are the ``rrise run`` flags ``--mc-budget``, ``--mc-deadline-ms``,
``--require-radius``, ``--mc-alpha`` and ``--mc-batch``; ``Runtime(bundle, mc_budget=N, …)``):
:meth:`McCertifier.from_options` opens the base model (None when ``--mc-budget`` is 0) and refuses
a required radius the budget cannot reach; the routing decides which frames get draws, and the
record keeps the larger certificate (``certified_by`` ``"mc"``, ``mc_draws``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rrise.bundle import Bundle, BundleError
from rrise.numerics import noisy_votes
from rrise.onnx_session import FASTEST, open_session
from rrise.sequential import (
    DEFAULT_MC_ALPHA,
    DEFAULT_MC_BATCH,
    SequentialOptions,
    check_required_radius,
    radius_from_lower_bound,
    required_probability,
    sequential_test,
    with_stated_stopping,
)
from rrise.trt_session import TensorRTBackend, engine_mismatch, tensorrt_available

__all__ = [
    "BaseClassifier",
    "EngineClassifier",
    "McCertifier",
    "McOptions",
    "McRefused",
    "McResult",
    "base_engine",
    "read_base_model",
]


class McRefused(ValueError):
    """Adaptive certification asked of a bundle or backend that cannot give it (no base model, a
    backend without one, a required radius the budget can never certify); one line naming the
    option. ``rrise run`` prints it and exits 2, as for any other bad option."""


@dataclass(frozen=True, kw_only=True)
class McOptions:
    """Adaptive Monte Carlo for ``rrise run`` and ``Runtime`` (field names are the flags).
    ``mc_budget`` 0, the default, is the one-pass runtime, unchanged. Bad values raise a one-line
    ValueError naming the flag; :meth:`McCertifier.from_options` also refuses a required radius
    the budget can never certify, naming the largest it can.

    Parameters
    ----------
    mc_budget:
        Base-model draws at most per frame (``--mc-budget``; 0: off; else at least one batch).
    mc_deadline_ms:
        Milliseconds the draws of one stream step may take (``--mc-deadline-ms``; None: none).
    require_radius:
        Spend draws only on frames whose surrogate radius is below it, and stop once it is
        certified or out of reach (``--require-radius``; None: the bundle's routing rule).
    mc_alpha:
        Level A of the Monte Carlo bound (``--mc-alpha``, default 0.001 as Cohen's α).
    mc_batch:
        Draws per base-model call (``--mc-batch``).

    Raises
    ------
    ValueError
        A value out of range, naming its flag.

    >>> McOptions(mc_budget=1024, require_radius=0.25).enabled, McOptions().enabled
    (True, False)
    >>> try:
    ...     McOptions(mc_alpha=1.5)
    ... except ValueError as exc:
    ...     print(exc)
    --mc-alpha must be in (0, 1), got 1.5
    """

    mc_budget: int = field(
        default=0,
        metadata={
            "help": "Base-model draws at most per frame whose surrogate radius falls short (0: off, the "
            "one-pass runtime; else at least one --mc-batch)."
        },
    )
    mc_deadline_ms: float | None = field(
        default=None,
        metadata={
            "help": "Milliseconds the draws of one certifying step may take (the stream never stalls "
            "longer, plus one batch); frames arriving meanwhile follow --drop-policy, counted in drops."
        },
    )
    require_radius: float | None = field(
        default=None,
        metadata={
            "help": "Spend draws on a frame only when its surrogate radius is below this radius, until "
            "it is certified or out of reach (default: the bundle's routing rule)."
        },
    )
    mc_alpha: float = field(
        default=DEFAULT_MC_ALPHA,
        metadata={"help": "Level of the Monte Carlo certificate (anytime-valid lower bound)."},
    )
    mc_batch: int = field(default=DEFAULT_MC_BATCH, metadata={"help": "Base-model draws per batch."})

    def __post_init__(self) -> None:
        if isinstance(self.mc_budget, bool) or not isinstance(self.mc_budget, int) or self.mc_budget < 0:
            raise ValueError(f"--mc-budget must be a non-negative integer (0: off), got {self.mc_budget!r}")
        if self.mc_budget == 0 and self.require_radius is not None:
            raise ValueError("--require-radius needs Monte Carlo draws: give --mc-budget N as well")
        if self.require_radius is not None and not (
            isinstance(self.require_radius, int | float) and 0 < self.require_radius < float("inf")
        ):
            raise ValueError(f"--require-radius must be a positive number, got {self.require_radius!r}")
        if self.mc_deadline_ms is not None and not (
            isinstance(self.mc_deadline_ms, int | float) and 0 < self.mc_deadline_ms < float("inf")
        ):
            raise ValueError(
                f"--mc-deadline-ms must be a positive number of milliseconds, got {self.mc_deadline_ms!r}"
            )
        if self.mc_budget:
            self.sequential()  # validates the budget, batch, deadline and alpha in one line each
        elif not (isinstance(self.mc_alpha, int | float) and 0.0 < self.mc_alpha < 1.0):
            raise ValueError(f"--mc-alpha must be in (0, 1), got {self.mc_alpha}")

    @property
    def enabled(self) -> bool:
        return self.mc_budget > 0

    def sequential(self) -> SequentialOptions:
        """The sequential test's options (only when ``mc_budget`` > 0)."""
        return SequentialOptions(
            budget=self.mc_budget,
            deadline_ms=self.mc_deadline_ms,
            alpha=self.mc_alpha,
            batch_size=self.mc_batch,
        )


def read_base_model(bundle: Bundle) -> bytes:
    """The bytes of the bundle's ``base_model`` file, checked against its sha256 in the manifest
    (both ``base_model.sha256`` and ``files``) after they were read, so the session opens exactly
    the bytes that were checked. Raises BundleError naming the file."""
    entry = bundle.manifest.get("base_model")
    if not isinstance(entry, dict) or not entry.get("file"):
        raise BundleError(f"bundle {bundle.path} names no base_model: Monte Carlo certification needs one")
    return bundle.read_verified(entry["file"], entry.get("sha256"))


def _rebuild_hint(bundle: Bundle) -> str:
    return f"build one on this device with `rrise-export --engine tensorrt --bundle {bundle.path}`"


def base_engine(bundle: Bundle, backend: str) -> dict[str, Any] | None:
    """The ``base_model.engines`` entry Monte Carlo runs on for the runtime's ``backend``, or None
    for onnxruntime. ``tensorrt``: the engine built for this GPU and TensorRT version, else
    :class:`McRefused` naming ``--backend`` (no engine of the base model, none for this GPU, or no
    TensorRT here). ``auto``: that engine where there is one and TensorRT imports, else None."""
    if backend == "onnxruntime":
        return None
    engines = list(bundle.manifest.get("base_model", {}).get("engines") or ())
    usable = bool(engines) and tensorrt_available()
    matching = [e for e in engines if engine_mismatch(e) is None] if usable else []
    if backend != "tensorrt":
        return matching[0] if matching else None
    where = f"--backend tensorrt with --mc-budget runs the base model on TensorRT, but bundle {bundle.path}"
    if not engines:
        raise McRefused(
            f"{where} has no engine of it (base_model.engines): {_rebuild_hint(bundle)}, or use "
            "--backend onnxruntime"
        )
    if not usable:
        raise McRefused(f"{where}: tensorrt and pycuda do not import here; use --backend onnxruntime")
    if not matching:
        raise McRefused(
            f"{where} has no engine of it for this GPU and TensorRT ({engine_mismatch(engines[0])}): "
            f"{_rebuild_hint(bundle)}, or use --backend onnxruntime"
        )
    return matching[0]


def _votes(out: np.ndarray, rows: int) -> np.ndarray:
    """A model's ``[B, K]`` outputs → ``[B]`` votes, −1 for a row that is not finite."""
    if out.ndim != 2 or len(out) != rows:
        raise ValueError(f"the base model must output [B, K], got shape {out.shape}")
    votes = out.argmax(axis=1).astype(np.int64)
    votes[~np.isfinite(out).all(axis=1)] = -1
    return votes


class EngineClassifier:
    """The base model's TensorRT engine (bytes checked against the manifest) through the runtime's
    engine runner (:class:`rrise.trt_session.TensorRTBackend`): ``[B, C, H, W]`` float32 → ``[B]``
    votes, −1 for a row whose output is not finite. ``close`` frees its GPU memory."""

    def __init__(self, engine: bytes, where: str) -> None:
        self.backend = TensorRTBackend(engine, output_kind="probs", where=where)  # raw outputs
        self.input_shape = tuple(self.backend.sample_shape)
        self.name = self.backend.name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _votes(self.backend.run(x), len(x))

    def close(self) -> None:
        self.backend.close()


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
        return _votes(self.session.run(None, {self.input_name: x})[0], len(x))


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
    batch size). ``require_radius``: the radius :meth:`improve` routes frames by (refused, naming
    the largest certifiable radius, when the budget can never reach it). ``clock`` (seconds) times
    the deadline; tests inject one. Not thread-safe: the caller serializes calls, as the Runtime
    serializes inference."""

    def __init__(
        self,
        classify: Callable[[np.ndarray], np.ndarray],
        sigma: float,
        options: SequentialOptions,
        *,
        num_classes: int | None = None,
        require_radius: float | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if require_radius is not None:
            check_required_radius(require_radius, sigma, options)
        self.require_radius = require_radius
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
        require_radius: float | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        threads: int | None = None,
        backend: str = "onnxruntime",
    ) -> McCertifier:
        """The bundle's base model (its bytes checked against the manifest) at the bundle's σ, on
        the runtime's ``backend`` (:func:`base_engine`: a TensorRT engine of the base model for
        ``tensorrt``, and for ``auto`` where one fits this GPU; onnxruntime otherwise)."""
        engine = base_engine(bundle, backend)
        if engine is None:
            classify: Any = BaseClassifier(read_base_model(bundle), threads=threads)
        else:
            data = bundle.read_verified(engine["file"], engine.get("sha256"))
            classify = EngineClassifier(data, where=str(bundle.file(engine["file"])))
        return cls(
            classify,
            bundle.sigma,
            options,
            num_classes=bundle.num_classes,
            require_radius=require_radius,
            seed=seed,
            clock=clock,
        )

    @classmethod
    def from_options(
        cls,
        bundle: Bundle,
        mc: McOptions,
        *,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        threads: int | None = None,
        backend: str = "onnxruntime",
    ) -> McCertifier | None:
        """:meth:`from_bundle` for ``rrise run``'s options and ``--backend``, with the stopping rule
        the bundle states (manifest ``adaptive.sequential``: the prior, futility level and first
        batch its routing rule was chosen with); None when ``mc_budget`` is 0 (off). A
        ``require_radius`` the budget can never certify is refused before the model is opened."""
        if not mc.enabled:
            return None
        stated = (bundle.manifest.get("adaptive") or {}).get("sequential")
        options = with_stated_stopping(mc.sequential(), stated)
        if mc.require_radius is not None:
            check_required_radius(mc.require_radius, bundle.sigma, options)
        return cls.from_bundle(
            bundle,
            options,
            require_radius=mc.require_radius,
            seed=seed,
            clock=clock,
            threads=threads,
            backend=backend,
        )

    def close(self) -> None:
        """Release the base model's resources (an engine's GPU memory)."""
        close = getattr(self.classify, "close", None)
        if close is not None:
            close()

    @property
    def clock(self) -> Callable[[], float]:
        """The clock (seconds) the deadline is timed with."""
        return self._clock

    def improve(self, x: np.ndarray, top_class: int, surrogate_radius: float) -> McResult | None:
        """Draws for a frame whose surrogate radius falls short of ``require_radius`` (None, without
        a draw, when it does not, or when no radius is required: then the caller's routing rule
        decides and calls :meth:`certify`)."""
        if self.require_radius is None or surrogate_radius >= self.require_radius:
            return None
        return self.certify(x, top_class, self.require_radius)

    def certify(
        self,
        x: np.ndarray,
        top_class: int,
        require_radius: float | None = None,
        *,
        deadline_ms: float | None = None,
        step_down: bool = False,
    ) -> McResult:
        """Spend draws on ``x`` (the preprocessed model input ``[C, H, W]``, float32 in [0, 1]) for
        ``top_class``; with ``require_radius``, stop as soon as the bound certifies it (or cannot
        within the budget); without, spend the budget or run to the deadline. ``deadline_ms``: a
        tighter deadline for this frame (e.g. what is left of a stream step's). ``step_down``: once
        ``require_radius`` is out of reach, aim at half of it, then at any radius
        (:func:`rrise.sequential.fallback_rungs`)."""
        options = self.options
        if options.step_down != bool(step_down):
            options = dataclasses.replace(options, step_down=bool(step_down))
        if deadline_ms is not None and (options.deadline_ms is None or deadline_ms < options.deadline_ms):
            options = dataclasses.replace(options, deadline_ms=max(float(deadline_ms), 1e-6))
        x = self._check_input(x)
        top_class = self._check_class(top_class)
        required = None if require_radius is None else required_probability(require_radius, self.sigma)

        def draw_batch(m: int) -> int:
            return noisy_votes(self.classify, x, top_class, self.sigma, m, self._rng)

        r = sequential_test(draw_batch, required, options, clock=self._clock)
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
