"""``Runtime``: frames in, certified-prediction records out, one surrogate pass per frame, and in
adaptive mode (``mc_budget`` > 0) base-model draws on the frames whose radius falls short.

The radius comes from :func:`rrise.certify_from_probs` with the calibration of the variant that
actually runs: a quantile is valid only for the numerics it was calibrated on, and that includes
the batch size (the backend never gets more rows at once than the variant's ``max_batch``).
Adaptive mode (:mod:`rrise.runtime.routing`) adds a Monte Carlo certificate for the surrogate's
class where it helps, and the record keeps the larger one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import Bundle, BundleError
from rrise.certificate import Calibration, Certificate, certify_from_probs
from rrise.monitor import ShiftMonitor, load_monitors
from rrise.ood import OodTest, combine_alarms
from rrise.records import Record, Verdict
from rrise.sequential import largest_certifiable_radius

from .adaptive import McCertifier, McOptions, McRefused, base_engine
from .backends import make_backend, variant_max_batch
from .options import StreamOptions
from .preprocess import FrameError, Preprocessor
from .routing import AdaptiveCertifier, Judged, Routing
from .sources import FrameSource
from .stream import Stream

__all__ = ["Runtime"]

log = logging.getLogger("rrise.runtime")


class Runtime:
    """A loaded bundle on one backend: frames in, certified-prediction records out.

    Parameters
    ----------
    bundle:
        A bundle folder or a loaded :class:`rrise.Bundle`.
    backend:
        ``"auto"`` (an engine for this GPU if the bundle has one, else onnxruntime),
        ``"onnxruntime"`` or ``"tensorrt"``.
    source_name:
        What records from :meth:`certify` and :meth:`certify_batch` name as their ``source``.
    precision:
        Run the bundle's variant of this precision (default: the best for this machine).
    watch:
        Watch the premise of every frame: the distribution-shift alarm (the *monitor*) and the
        out-of-distribution flag (*ood*), where the variant's manifest entry has their references.
        False: neither (``alarm`` and ``ood_p`` always None). A mapping: watch, with these
        overrides of the references' settings (:func:`rrise.monitor.load_monitors`: ``window``,
        ``false_alarm``, ``step``, ``stride``; ``ood_rate``, 0 for p-values only; ``ood=False``).
    expect_id, trust:
        Refuse (BundleError) any bundle whose id is not ``expect_id``, or that the Ed25519 public
        key ``trust`` (a key or its file) did not sign (:meth:`rrise.Bundle.load`).
    mc:
        Adaptive certification: :class:`~rrise.runtime.adaptive.McOptions`, or a ready
        :class:`~rrise.runtime.adaptive.McCertifier` (another base-model runner, a test's clock).
        None: from ``mc_options``.
    **mc_options:
        ``mc_budget``, ``mc_deadline_ms``, ``require_radius``, ``mc_alpha``, ``mc_batch``: the
        fields of :class:`~rrise.runtime.adaptive.McOptions` (``mc_budget`` 0, the default: one
        pass, records exactly as without adaptive mode). With ``mc_budget`` > 0 every record also
        carries ``certified_by`` and ``mc_draws``.

    ``certify(frame)`` → record; ``certify_batch(frames)`` → records; ``stream(source)`` → an
    iterable of records for a camera, video, folder or ``PushSource``. A frame that cannot be
    certified (unreadable, wrong shape or dtype, NaN, a failed inference) gives an error record
    (``error`` says why, ``pred`` None, ``abstain`` True) instead of raising, so a stream goes on.
    With the shift alarm, every record carries its ``alarm`` word (None while the stream looks like
    the calibration data); with the ood test, every certified record carries ``ood_p`` and
    ``alarm`` starts with ``"ood"`` when it is at most the flag rate. Thread-safe: ``seq``
    numbering and the monitor are under one lock, and inference is serialized.

    Raises
    ------
    rrise.BundleError
        A bundle that does not load, or not the one ``expect_id``/``trust`` ask for.
    ValueError
        A bundle whose labels do not match its classes, or bad monitor settings.
    rrise.runtime.adaptive.McRefused
        Adaptive mode the bundle or backend cannot give (a ValueError naming the option).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
    >>> folder = Path(tempfile.mkdtemp())
    >>> bundle = make_linear_bundle(linear_sources(folder), folder / "bundle").path
    >>> with Runtime(bundle, backend="onnxruntime") as runtime:
    ...     one = runtime.certify(np.full((4, 4), 200, np.uint8))
    ...     two = runtime.certify_batch([np.zeros((4, 4), np.uint8), None])
    >>> one["seq"], one["label"] in ("a", "b", "c", None), one["radius"] >= 0.0
    (0, True, True)
    >>> [r["seq"] for r in two], two[1]["abstain"], two[1]["error"][:9]
    ([1, 2], True, 'bad frame')
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        backend: str = "auto",
        source_name: str = "api",
        *,
        precision: str | None = None,
        watch: bool | Mapping[str, Any] = True,
        expect_id: str | None = None,
        trust: Any = None,
        mc: McOptions | McCertifier | None = None,
        **mc_options: Any,
    ) -> None:
        mc = _mc_choice(mc, mc_options)
        if isinstance(bundle, Bundle):  # pinned or trusted: its files and manifest are checked again
            if expect_id is not None or trust is not None:
                bundle.check_files()
                bundle.require(expect_id=expect_id, trust=trust)
            self._bundle = bundle
        else:
            self._bundle = Bundle.load(bundle, expect_id=expect_id, trust=trust)
        manifest = self._bundle.manifest
        if isinstance(mc, McOptions):  # the base model's backend, refused by name before any model opens
            base_engine(self._bundle, backend)
        self._backend, self._variant = make_backend(self._bundle, backend, precision=precision)
        self._max_batch = variant_max_batch(self._variant)
        self._calibration = self._bundle.calibration(self._variant)
        self._pre = Preprocessor(manifest["preprocess"], manifest["model"]["input"]["shape"])
        self._labels = self._bundle.labels
        self._num_classes = self._bundle.num_classes
        if len(self._labels) != self._num_classes:
            raise ValueError(
                f"bundle {self._bundle.path} has {len(self._labels)} labels for {self._num_classes} classes"
            )
        self._monitor, self._ood = (
            load_monitors(
                self._variant,
                num_classes=self._num_classes,
                channels=self._pre.channels,
                options=None if isinstance(watch, bool) else dict(watch),
            )
            if watch is not False
            else (None, None)
        )
        self._bundle_id = self._bundle.id
        self.source_name = str(source_name)
        self._seq = 0
        self._lock = threading.Lock()  # seq numbering and the monitor
        self._infer_lock = threading.Lock()
        self._adaptive = None if mc is None else _adaptive(self._bundle, mc, backend)
        self._mc_lock = threading.Lock()

    # --- views ------------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle:
        return self._bundle

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def calibration(self) -> Calibration:
        """The calibration of the running variant (its own quantile)."""
        return self._calibration

    @property
    def variant(self) -> dict[str, Any]:
        return dict(self._variant)

    @property
    def max_batch(self) -> int:
        """The most frames one backend call gets: the running variant's ``max_batch`` (default 1)."""
        return self._max_batch

    @property
    def adaptive(self) -> AdaptiveCertifier | None:
        """Adaptive certification (its Monte Carlo certifier and routing), None in one-pass mode."""
        return self._adaptive

    @property
    def monitor(self) -> ShiftMonitor | None:
        """The distribution-shift monitor, or None (no monitor entry in the bundle, or turned off)."""
        return self._monitor

    @property
    def ood(self) -> OodTest | None:
        """The per-frame out-of-distribution test, or None (no ``ood`` entry, or turned off)."""
        return self._ood

    @property
    def preprocessor(self) -> Preprocessor:
        return self._pre

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    # --- certification ----------------------------------------------------------------------
    def certify(
        self, frame: np.ndarray | None, *, stamp_ns: int | None = None, frame_index: int | None = None
    ) -> dict[str, Any]:
        """One frame → one record.

        Parameters
        ----------
        frame:
            A BGR or grey uint8 image as a camera gives it (None: an unreadable frame).
        stamp_ns:
            Its capture time, Unix ns (default: now).
        frame_index:
            Its index in the source (default: its ``seq``).

        Returns
        -------
        dict
            The record (:data:`rrise.records.RECORD_KEYS`); an unusable frame gives an error
            record (``error`` says why).

        Raises
        ------
        TypeError
            ``stamp_ns`` or ``frame_index`` not an int.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
        >>> folder = Path(tempfile.mkdtemp())
        >>> runtime = Runtime(make_linear_bundle(linear_sources(folder), folder / "bundle").path)
        >>> record = runtime.certify(np.full((4, 4), 200, np.uint8), stamp_ns=1_700_000_000_000_000_000)
        >>> record["stamp_ns"], record["error"], record["abstain"] or record["radius"] > 0
        (1700000000000000000, None, True)
        """
        stamp = time.time_ns() if stamp_ns is None else _stamp(stamp_ns, "stamp_ns")
        indices = None if frame_index is None else [_index(frame_index, "frame_index")]
        verdict = self.certify_frames([frame], frame_indices=indices)[0]
        return self._stamped(verdict, stamp, self.source_name)

    def certify_batch(
        self,
        frames: Sequence[np.ndarray | None],
        *,
        stamp_ns: int | Sequence[int] | None = None,
        frame_indices: Sequence[int] | None = None,
        source: str | None = None,
    ) -> list[dict[str, Any]]:
        """Frames → records in the same order; the good frames go to the backend in micro-batches
        of at most :attr:`max_batch`.

        Parameters
        ----------
        frames:
            A list of frames (None for an unreadable one) or an ``[N, H, W(, C)]`` array.
        stamp_ns:
            Capture time(s), Unix ns: one for all, one per frame, or None (now).
        frame_indices:
            Each frame's index in its source (default: its ``seq``).
        source:
            What the records name as their ``source`` (default :attr:`source_name`).

        Returns
        -------
        list of dict
            One record per frame, in order, with consecutive ``seq``.

        Raises
        ------
        TypeError, ValueError
            Arguments of the wrong type, length or range, each naming the argument.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from tests.tiny_bundle import linear_sources, make_linear_bundle  # a real 1×4×4 bundle
        >>> folder = Path(tempfile.mkdtemp())
        >>> runtime = Runtime(make_linear_bundle(linear_sources(folder), folder / "bundle").path)
        >>> records = runtime.certify_batch(np.zeros((3, 4, 4), np.uint8), frame_indices=[7, 8, 9])
        >>> [r["frame"] for r in records], [r["seq"] for r in records]
        ([7, 8, 9], [0, 1, 2])
        """
        frames = _frame_list(frames)
        stamps = _stamps(stamp_ns, len(frames))
        if source is not None and not isinstance(source, str):
            raise TypeError(f"source must be a str naming the stream, got {source!r}")
        name = self.source_name if source is None else source
        verdicts = self.certify_frames(frames, frame_indices=frame_indices)
        return [self._stamped(v, stamp, name) for v, stamp in zip(verdicts, stamps)]

    def certify_frames(
        self, frames: Sequence[np.ndarray | None], *, frame_indices: Sequence[int] | None = None
    ) -> list[Verdict]:
        """Frames → one :class:`rrise.records.Verdict` each (numbered, not yet stamped into a
        record: a :class:`~rrise.runtime.stream.Stream` does that with the source's stamps)."""
        n = len(frames)
        if frame_indices is not None:
            frame_indices = [_index(i, "frame_indices[]") for i in _listed(frame_indices, "frame_indices")]
            if len(frame_indices) != n:
                raise ValueError(f"{len(frame_indices)} frame_indices for {n} frames")
        errors: list[str | None] = [None] * n
        certs: list[Certificate | None] = [None] * n
        ood_ps: list[float | None] = [None] * n
        inputs, rows = [], []
        for i, frame in enumerate(frames):
            try:
                inputs.append(self._pre(frame))
                rows.append(i)
            except FrameError as exc:
                errors[i] = f"bad frame: {exc}"
        step = self._max_batch
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            x = inputs[start][None] if len(chunk) == 1 else np.stack(inputs[start : start + step])
            probs, error = self._infer(x)
            ps = [None] * len(chunk) if error is not None else self._ood_p(x, probs)
            for j, i in enumerate(chunk):
                certs[i], errors[i] = (None, error) if error is not None else self._certificate(probs[j])
                ood_ps[i] = ps[j]
        judged = self._judge(inputs, rows, certs)
        indices = [None] * n if frame_indices is None else frame_indices
        with self._lock:
            return [self._verdict(certs[i], errors[i], indices[i], ood_ps[i], judged[i]) for i in range(n)]

    def stream(self, source: str | int | Path | FrameSource, options: StreamOptions | None = None) -> Stream:
        """The frames of ``source`` as an iterable of records (and status records), read as
        ``options`` say (:class:`~rrise.runtime.options.StreamOptions`: ``batch``, ``drop_policy``,
        ``max_frames``, ``status_interval``…). The stream does not close this Runtime."""
        return Stream(self, source, options)

    # --- the steps --------------------------------------------------------------------------
    def _infer(self, x: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """``[B, C, H, W]`` (B ≤ max_batch) → ``[B, K]`` float64 probabilities, or why not."""
        try:
            with self._infer_lock:
                probs = self._backend.run(x)
        except Exception as exc:  # a failed inference must not end the stream
            log.debug("inference failed", exc_info=True)
            return None, f"inference failed: {exc}"
        probs = np.asarray(probs, dtype=np.float64)  # no copy for a backend's float64 array
        if probs.shape != (len(x), self._num_classes):
            return None, f"model output shape {probs.shape} is not [{len(x)}, {self._num_classes}]"
        return probs, None

    def _judge(
        self, inputs: list[np.ndarray], rows: list[int], certs: list[Certificate | None]
    ) -> list[Judged | None]:
        """Adaptive mode: each frame's outcome (:class:`~rrise.runtime.routing.Judged`), None for
        frames without a certificate; one pass: all None."""
        judged: list[Judged | None] = [None] * len(certs)
        if self._adaptive is None or not rows:
            return judged
        with self._mc_lock:
            outcome = self._adaptive.judge(inputs, [certs[i] for i in rows])
        for i, one in zip(rows, outcome):
            judged[i] = one
        return judged

    def _ood_p(self, x: np.ndarray, probs: np.ndarray) -> list[float | None]:
        """The out-of-distribution p-value of each row (None without the test or for NaN outputs)."""
        if self._ood is None or not np.all(np.isfinite(probs)):
            return [None] * len(x)
        return [float(p) for p in self._ood.p_values(x, probs)]

    def _certificate(self, probs: np.ndarray) -> tuple[Certificate | None, str | None]:
        try:  # certify_from_probs refuses NaN and ±inf (one reduction, not two)
            return certify_from_probs(probs, self._calibration), None
        except ValueError as exc:
            return None, f"model output unusable: {exc}"

    def _verdict(
        self,
        cert: Certificate | None,
        error: str | None,
        frame_index: int | None,
        ood_p: float | None,
        judged: Judged | None = None,
    ) -> Verdict:
        """The next verdict; call with :attr:`_lock` held (a batch holds it throughout, so its seqs
        are consecutive). The shift alarm sees every certified frame (the surrogate's certificate:
        the premise it watches is the surrogate's); error records carry its current word,
        untested; a flagged out-of-distribution p-value puts ``ood`` first. In adaptive mode the
        verdict carries ``judged``'s certificate, ``certified_by`` and ``mc_draws``."""
        seq = self._seq
        self._seq = seq + 1
        alarm = None
        monitor = self._monitor
        if cert is None:
            ood_p = None
        if monitor is not None:
            alarm = monitor.alarm if cert is None else monitor.update(cert.score, cert.abstain, ood_p)
        if self._ood is not None and self._ood.flagged(ood_p):
            alarm = combine_alarms(["ood", alarm])
        frame = seq if frame_index is None else frame_index
        if self._adaptive is None:
            label = None if cert is None or cert.pred is None else self._labels[cert.pred]
            return Verdict(seq, frame, cert, label, error, alarm, ood_p)
        if judged is not None:
            cert = judged.certificate
        label = None if cert is None or cert.pred is None else self._labels[cert.pred]
        by, draws = (None, 0) if judged is None else (judged.certified_by, judged.mc_draws)
        return Verdict(seq, frame, cert, label, error, alarm, ood_p, by, draws)

    def _stamped(self, verdict: Verdict, stamp: int, source: str) -> dict[str, Any]:
        latency = (time.time_ns() - stamp) / 1e6
        return Record.of(
            verdict, stamp_ns=stamp, latency_ms=latency, source=source, bundle=self._bundle_id
        ).to_dict()

    def close(self) -> None:
        """Release the backend's resources (GPU memory for TensorRT); the Runtime is unusable after."""
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()
        if self._adaptive is not None:  # the base model's engine, if it runs on one
            self._adaptive.mc.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        v = self._variant
        return (
            f"Runtime(bundle={self._bundle_id}, variant={v.get('precision')}/{v.get('backend')}, "
            f"backend={self.backend_name}, max_batch={self._max_batch}, "
            f"quantile={self._calibration.quantile})"
        )


def _mc_choice(mc: McOptions | McCertifier | None, fields: dict[str, Any]) -> McOptions | McCertifier | None:
    """What adaptive mode runs with: ``mc``, or :class:`McOptions` of ``fields``; None when off."""
    if mc is not None and fields:
        raise TypeError(f"give mc or its fields ({', '.join(fields)}), not both")
    if mc is None:
        known = {f.name for f in dataclasses.fields(McOptions)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"Runtime() got unexpected keyword(s) {', '.join(unknown)}")
        mc = McOptions(**fields)
    if isinstance(mc, McOptions):
        return mc if mc.enabled else None
    if isinstance(mc, McCertifier):
        return mc
    raise TypeError(f"mc must be McOptions or McCertifier, got {type(mc).__name__}")


def _adaptive(bundle: Bundle, mc: McOptions | McCertifier, backend: str) -> AdaptiveCertifier:
    """Adaptive certification for ``bundle``; :class:`McRefused` (naming the option) when the
    bundle cannot give it: no base model, no routing rule and no required radius, a required
    radius the budget can never certify."""
    require = mc.require_radius
    try:
        routing = Routing.of_bundle(bundle.manifest, require)
        if isinstance(mc, McOptions):
            mc = McCertifier.from_options(bundle, mc, backend=backend)
        top = largest_certifiable_radius(mc.sigma, mc.options)
        if routing.target_radius > top:
            raise McRefused(
                f"--mc-budget {mc.options.budget} cannot certify the {routing.origin} target radius "
                f"{routing.target_radius:g} (the largest it can is {top:.4f}): raise --mc-budget or "
                "give --require-radius"
            )
    except McRefused:
        raise
    except BundleError as exc:
        raise McRefused(f"--mc-budget needs the bundle's base model: {exc}") from None
    except ValueError as exc:
        raise McRefused(str(exc).splitlines()[0]) from None
    return AdaptiveCertifier(mc, routing)


def _listed(values: Any, name: str) -> list[Any]:
    """``values`` (a list, tuple, array or other iterable) as a list; TypeError naming ``name``."""
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list or a sequence, got {type(values).__name__} {values!r:.60}")
    return list(values)


def _frame_list(frames: Any) -> Sequence[Any]:
    """The frames of a batch: a list/tuple of arrays (or None for an unreadable frame), or an
    ``[N, …]`` array; anything else is a TypeError naming ``frames``."""
    if isinstance(frames, np.ndarray):
        if frames.ndim < 3:
            raise TypeError(f"frames must be a list of frames or an [N, H, W(, C)] array, not {frames.shape}")
        return frames
    return _listed(frames, "frames")


def _stamp(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        hint = " (give nanoseconds as an int, e.g. time.time_ns())" if isinstance(value, float) else ""
        raise TypeError(f"{name} must be an int, the capture time in Unix ns, got {value!r:.80}{hint}")
    return int(value)


def _index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r:.80}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _stamps(stamp_ns: int | Sequence[int] | None, n: int) -> list[int]:
    if stamp_ns is None:
        return [time.time_ns()] * n
    if isinstance(stamp_ns, (int, np.integer)) and not isinstance(stamp_ns, bool):
        return [int(stamp_ns)] * n
    if not hasattr(stamp_ns, "__iter__") or isinstance(stamp_ns, (str, bytes, dict)):
        return [_stamp(stamp_ns, "stamp_ns")] * n  # raises, naming stamp_ns
    stamps = [_stamp(s, "stamp_ns[]") for s in stamp_ns]
    if len(stamps) != n:
        raise ValueError(f"{len(stamps)} stamp_ns values for {n} frames")
    return stamps
