"""Startup retries: a source that is absent when the run starts (a camera not yet plugged in, an
RTSP server still booting, a file or folder not yet written) is retried with capped exponential
backoff instead of ending the run at once.

``rrise run --retry N`` allows N more attempts after the first failed open; ``--retry forever`` never
gives up. Once the source has opened, losing it later is the source's own business (live sources
reconnect with backoff, see :class:`~rrise.runtime.sources.VideoCaptureSource`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .options import FOREVER, parse_retry
from .source_specs import open_source
from .sources import Frame, FrameSource, SourceError, is_url

__all__ = ["StartupRetrySource", "open_with_retry"]

log = logging.getLogger("rrise.runtime")

_LOUD_ATTEMPTS = 3  # the first few failures are warnings; then one warning every 10th attempt


def _looks_live(spec: str | int | Path) -> bool:
    """Whether ``spec`` names a live source (camera, device, URL, pipeline) before it can be opened."""
    if isinstance(spec, int):
        return True
    text = str(spec).strip()
    if text.lower().startswith("file://"):
        return False
    return text.isdigit() or is_url(text) or "!" in text or text.startswith("/dev/")


def _name_of(spec: str | int | Path) -> str:
    text = str(spec).strip()
    return f"camera:{text}" if text.isdigit() else text


class StartupRetrySource(FrameSource):
    """A source that failed to open at start, opened again with backoff when iterated.

    ``retries``: attempts after the first failure (None: forever). The wait before attempt k is
    ``backoff_s · 2^(k−1)``, capped at ``backoff_max_s``. :attr:`state` is ``"connecting"`` until the
    source opens, then the source's own; :meth:`stop` ends the wait at once. When the attempts run
    out, iteration raises :class:`SourceError` with the last reason, which ends the stream with
    ``source_error`` set.
    """

    waits_to_open = True

    def __init__(
        self,
        spec: str | int | Path,
        first_error: SourceError,
        *,
        retries: int | None,
        opener: Callable[..., FrameSource] = open_source,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        **options: Any,
    ) -> None:
        super().__init__()
        if not 0 < backoff_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_s <= backoff_max_s, got {backoff_s}, {backoff_max_s}")
        self.spec, self.retries = spec, retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.is_live = _looks_live(spec)
        self.attempts = 1  # the failed first open
        self.last_error = first_error
        self._opener, self._options = opener, options
        self._inner: FrameSource | None = None
        self._gave_up = False

    # The opened source's view, once there is one.
    @property
    def name(self) -> str:  # type: ignore[override]
        return self._inner.name if self._inner is not None else _name_of(self.spec)

    @property
    def state(self) -> str:
        if self._inner is not None:
            return self._inner.state
        return "ended" if self._gave_up else "connecting"

    @property
    def reconnects(self) -> int:  # type: ignore[override]
        return 0 if self._inner is None else self._inner.reconnects

    @property
    def dropped(self) -> int:  # type: ignore[override]
        return 0 if self._inner is None else self._inner.dropped

    @property
    def frame_count(self) -> int | None:
        return None if self._inner is None else self._inner.frame_count

    def __iter__(self) -> Iterator[Frame]:
        inner = self._inner or self._open_with_backoff()
        if inner is None:  # stopped while waiting
            return
        yield from inner

    def _open_with_backoff(self) -> FrameSource | None:
        delay, started = self.backoff_s, time.monotonic()
        while self.retries is None or self.attempts <= self.retries:
            if self._stop.wait(delay):
                return None
            self.attempts += 1
            try:
                self._inner = self._opener(self.spec, **self._options)
            except SourceError as exc:
                self.last_error = exc
                retry_no = self.attempts - 1
                loud = retry_no <= _LOUD_ATTEMPTS or retry_no % 10 == 0
                log.log(logging.WARNING if loud else logging.DEBUG, "retry %d: %s", retry_no, exc)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            if self._stop.is_set():  # stopped during the open: do not start reading
                self._inner.close()
                return None
            log.warning("%s opened after %d attempt(s)", self._inner.name, self.attempts)
            return self._inner
        self._gave_up = True
        raise SourceError(
            f"{self.last_error} (gave up after {self.retries} retr{'y' if self.retries == 1 else 'ies'} "
            f"over {time.monotonic() - started:.1f} s)"
        )

    def stop(self) -> None:
        super().stop()
        if self._inner is not None:
            self._inner.stop()

    def close(self) -> None:
        self.stop()
        if self._inner is not None:
            self._inner.close()


def open_with_retry(
    spec: str | int | Path,
    retry: int | str | None = 0,
    *,
    opener: Callable[..., FrameSource] = open_source,
    backoff_s: float = 0.5,
    backoff_max_s: float = 8.0,
    **options: Any,
) -> FrameSource:
    """Open ``spec`` (``opener``: :func:`open_source`); if that fails and ``retry`` allows, a
    :class:`StartupRetrySource` that keeps trying with backoff once it is iterated. ``retry``: a
    count of retries, or ``"forever"``; 0 raises the first :class:`SourceError` at once."""
    retries = parse_retry(retry)
    try:
        return opener(spec, **options)
    except SourceError as exc:
        if retries == 0:
            raise
        log.warning(
            "%s; retrying %s with backoff (%.1f s, doubling, at most %.1f s apart)",
            exc,
            FOREVER if retries is None else f"up to {retries} time(s)",
            backoff_s,
            backoff_max_s,
        )
        return StartupRetrySource(
            spec,
            exc,
            retries=retries,
            opener=opener,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            **options,
        )
