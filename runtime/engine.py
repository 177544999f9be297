"""``Runtime``: frames in, certified-prediction records out, one surrogate pass per frame.

The radius comes from :func:`rrise.certify_from_probs` with the calibration of the variant that
actually runs: a quantile is valid only for the numerics it was calibrated on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rrise.bundle import Bundle
from rrise.certificate import Calibration, Certificate, certify_from_probs
from rrise.monitor import ShiftMonitor
from rrise.records import make_record

from .backends import make_backend
from .preprocess import FrameError, Preprocessor

__all__ = ["Runtime"]

log = logging.getLogger("rrise.runtime")


class Runtime:
    """A loaded bundle on one backend. ``certify(frame)`` → record; ``certify_batch(frames)`` → records.

    A frame that cannot be certified (unreadable, wrong shape or dtype, NaN, a failed inference)
    gives an error record (``error`` says why, ``pred`` None, ``abstain`` True) instead of raising,
    so a stream goes on. Thread-safe for ``seq`` numbering; the backend serializes inference.

    When the running variant's manifest entry has a ``monitor`` reference (bundles built by this
    version of ``rrise-export`` do), every record also goes through the distribution-shift test
    of :class:`rrise.monitor.ShiftMonitor` and carries its ``alarm`` word (``None`` while the
    stream looks like the calibration data). Without one, or with ``monitor=False``, ``alarm`` is
    always ``None``. ``monitor_options`` (``window``, ``false_alarm``, ``stride``) override the
    reference's settings.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        backend: str = "auto",
        source_name: str = "api",
        *,
        precision: str | None = None,
        monitor: bool = True,
        monitor_options: dict[str, Any] | None = None,
    ) -> None:
        self._bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        manifest = self._bundle.manifest
        self._backend, self._variant = make_backend(self._bundle, backend, precision=precision)
        self._calibration = self._bundle.calibration(self._variant)
        self._pre = Preprocessor(manifest["preprocess"], manifest["model"]["input"]["shape"])
        self._labels = self._bundle.labels
        if len(self._labels) != self._bundle.num_classes:
            raise ValueError(
                f"bundle {self._bundle.path} has {len(self._labels)} labels for "
                f"{self._bundle.num_classes} classes"
            )
        self._monitor = (
            ShiftMonitor.from_variant(self._variant, **(monitor_options or {})) if monitor else None
        )
        self.source_name = str(source_name)
        self._seq = 0
        self._lock = threading.Lock()
        self._infer_lock = threading.Lock()

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
    def monitor(self) -> ShiftMonitor | None:
        """The distribution-shift monitor, or None (no monitor entry in the bundle, or turned off)."""
        return self._monitor

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
        """One frame → one record. ``stamp_ns`` is the capture time (default: now)."""
        return self.certify_batch(
            [frame],
            stamp_ns=None if stamp_ns is None else [stamp_ns],
            frame_indices=None if frame_index is None else [frame_index],
        )[0]

    def certify_batch(
        self,
        frames: Sequence[np.ndarray | None],
        *,
        stamp_ns: int | Sequence[int] | None = None,
        frame_indices: Sequence[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Frames → records in the same order, in one backend call for all the good frames."""
        n = len(frames)
        now = time.time_ns()
        if stamp_ns is None:
            stamps = [now] * n
        elif isinstance(stamp_ns, (int, np.integer)):
            stamps = [int(stamp_ns)] * n
        else:
            stamps = [int(s) for s in stamp_ns]
        if len(stamps) != n:
            raise ValueError(f"{len(stamps)} stamps for {n} frames")
        if frame_indices is not None and len(frame_indices) != n:
            raise ValueError(f"{len(frame_indices)} frame indices for {n} frames")

        errors: list[str | None] = [None] * n
        certs: list[Certificate | None] = [None] * n
        inputs, ok = [], []
        for i, frame in enumerate(frames):
            try:
                inputs.append(self._pre(frame))
                ok.append(i)
            except FrameError as exc:
                errors[i] = f"bad frame: {exc}"
        if ok:
            self._infer(inputs[0][None] if len(inputs) == 1 else np.stack(inputs), ok, certs, errors)

        records = []
        monitor = self._monitor
        with self._lock:
            for i in range(n):
                seq = self._seq
                self._seq += 1
                cert = certs[i]
                alarm = None
                if monitor is not None:  # error records carry the current alarm, untested
                    alarm = monitor.alarm if cert is None else monitor.update(cert.score, cert.abstain)
                records.append(
                    make_record(
                        seq=seq,
                        frame=seq if frame_indices is None else int(frame_indices[i]),
                        stamp_ns=stamps[i],
                        source=self.source_name,
                        bundle=self._bundle.id,
                        certificate=certs[i],
                        labels=self._labels,
                        latency_ms=(time.time_ns() - stamps[i]) / 1e6,
                        error=errors[i],
                        alarm=alarm,
                    )
                )
        return records

    def _infer(
        self,
        x: np.ndarray,
        rows: list[int],
        certs: list[Certificate | None],
        errors: list[str | None],
    ) -> None:
        try:
            with self._infer_lock:
                probs = np.asarray(self._backend.run(x), dtype=np.float64)
        except Exception as exc:  # a failed inference must not end the stream
            log.debug("inference failed", exc_info=True)
            for i in rows:
                errors[i] = f"inference failed: {exc}"
            return
        k = self._bundle.num_classes
        if probs.shape != (len(rows), k):
            for i in rows:
                errors[i] = f"model output shape {probs.shape} is not [{len(rows)}, {k}]"
            return
        finite = np.isfinite(probs.sum(axis=1))  # NaN and ±inf survive the sum
        good = [i for i, f in zip(rows, finite, strict=True) if f]
        for i, f in zip(rows, finite, strict=True):
            if not f:
                errors[i] = "model output contains NaN or inf"
        if len(good) > 16:  # large batches: the vectorized rule
            batch = certify_from_probs(probs[finite], self._calibration)
            for j, i in enumerate(good):
                certs[i] = batch[j]
        else:  # a frame or a micro-batch: one Certificate per row, no batch object in between
            for i, row in zip(rows, probs, strict=True):
                if errors[i] is None:
                    certs[i] = certify_from_probs(row, self._calibration)

    def close(self) -> None:
        """Release the backend's resources (GPU memory for TensorRT); the Runtime is unusable after."""
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        v = self._variant
        return (
            f"Runtime(bundle={self._bundle.id}, variant={v.get('precision')}/{v.get('backend')}, "
            f"backend={self.backend_name}, quantile={self._calibration.quantile})"
        )
