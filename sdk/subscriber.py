"""Subscriber client: ``rrise.subscribe(endpoint)`` yields validated records from a runtime.

pyzmq is imported when a subscription is opened, so ``import rrise`` does not need it. The SUB
socket connects (ZeroMQ reconnects by itself, with backoff, if the publisher restarts or the link
drops), and every message is checked: anything that is not a ``[topic, msgpack record]`` of a known
schema version is skipped and counted, never yielded. Status records (topic ``<topic>.status``)
are yielded only with ``status=True``; otherwise they are counted and skipped. Records the
publisher dropped for this subscriber (it fell ``hwm`` behind) show as gaps in ``seq`` and are
counted in ``stats["missed"]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import msgpack

from .records import (
    DEFAULT_TOPIC,
    RECORD_VERSION,
    STATUS_SUFFIX,
    RecordError,
    status_topic,
    unpack,
    unpack_status,
)

__all__ = ["Subscription", "subscribe"]

log = logging.getLogger("rrise.subscriber")

_POLL_MS = 200  # poll in slices so Ctrl-C and close() are noticed promptly


class Subscription:
    """An open SUB socket; iterate it for records. ``stats`` counts ``received`` (records yielded),
    ``malformed`` (messages skipped, for any reason), ``unsupported_version`` (those among the
    malformed that carried another schema version), ``status`` (status records seen) and
    ``missed`` (frame records lost on the way, from gaps in ``seq``). Use as a context manager or
    call ``close()``."""

    def __init__(
        self,
        endpoint: str,
        topic: bytes | str = DEFAULT_TOPIC,
        *,
        timeout_s: float | None = None,
        stats: dict[str, int] | None = None,
        status: bool = False,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 5000,
        rcvhwm: int = 10_000,
    ) -> None:
        try:
            import zmq
        except ImportError as exc:
            raise RuntimeError("subscribing needs pyzmq: pip install 'rrise[runtime]'") from exc
        self._zmq = zmq
        self.endpoint = endpoint
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self.status_topic = status_topic(self.topic)
        self.want_status = bool(status)
        self.timeout_s = timeout_s
        self.stats = stats if stats is not None else {}
        self._last_seq: dict[tuple[str, str], int] = {}
        for key in ("received", "malformed", "unsupported_version", "status", "missed"):
            self.stats.setdefault(key, 0)
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
            self._sock.setsockopt(zmq.RECONNECT_IVL, int(reconnect_ivl_ms))
            self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(reconnect_ivl_max_ms))
            self._sock.setsockopt(zmq.SUBSCRIBE, self.topic)
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ValueError(f"cannot subscribe to {endpoint!r}: {exc}") from None
        self._closed = False
        self._warned_version = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        zmq = self._zmq
        if self._closed:
            raise StopIteration
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            if deadline is None:
                wait_ms = _POLL_MS
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise StopIteration
                wait_ms = max(1, min(_POLL_MS, int(left * 1000)))
            if not self._sock.poll(wait_ms, zmq.POLLIN):
                continue
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
            if deadline is not None:  # any message, even a bad one, means the link is alive
                deadline = time.monotonic() + self.timeout_s
            record = self._parse(parts)
            if record is not None:
                self.stats["received"] += 1
                return record

    def _parse(self, parts: list[bytes]) -> dict[str, Any] | None:
        if len(parts) == 2 and parts[0].startswith(self.topic) and parts[0].endswith(STATUS_SUFFIX):
            try:
                status = unpack_status(parts[1])
            except RecordError:
                self.stats["malformed"] += 1
                return None
            self.stats["status"] += 1
            return status if self.want_status else None
        if len(parts) != 2 or not parts[0].startswith(self.topic):
            self.stats["malformed"] += 1
            return None
        try:
            record = unpack(parts[1])
        except RecordError as exc:
            self.stats["malformed"] += 1
            if _other_version(parts[1]):
                self.stats["unsupported_version"] += 1
                if not self._warned_version:
                    self._warned_version = True
                    log.warning(
                        "skipping records from %s: %s (this rrise reads v%d; upgrade one side)",
                        self.endpoint,
                        exc,
                        RECORD_VERSION,
                    )
            return None
        self._count_gap(record)
        return record

    def _count_gap(self, record: dict[str, Any]) -> None:
        seq = record.get("seq")
        if not isinstance(seq, int):
            return
        key = (str(record.get("source")), str(record.get("bundle")))
        last = self._last_seq.get(key)
        if last is not None and seq > last + 1:
            self.stats["missed"] += seq - last - 1
        self._last_seq[key] = seq  # a lower seq: the publisher restarted, count afresh

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None and not getattr(self, "_closed", True):
            sock.close(linger=0)


def _other_version(payload: bytes) -> bool:
    """Whether a rejected payload is a well-formed map of another schema version."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception:
        return False
    return isinstance(obj, dict) and "v" in obj and obj["v"] != RECORD_VERSION


def subscribe(
    endpoint: str,
    topic: bytes | str = DEFAULT_TOPIC,
    *,
    timeout_s: float | None = None,
    stats: dict[str, int] | None = None,
    status: bool = False,
) -> Iterator[dict[str, Any]]:
    """Connect to ``endpoint`` and yield validated records published on ``topic``.

    Malformed messages and records of another schema version are skipped and counted in ``stats``
    (``stats["malformed"]``; ``stats["unsupported_version"]`` for the latter). With
    ``status=True`` the runtime's periodic status records (``kind == "status"``) are yielded too.
    ZeroMQ reconnects by itself when the publisher restarts. Iteration stops when ``timeout_s``
    passes without any message (``None``: never). The socket is connected when this returns, so a
    publisher can wait for it before sending.

    Example::

        for record in rrise.subscribe("tcp://127.0.0.1:5555", timeout_s=10):
            print(record["pred"], record["radius"])
    """
    return Subscription(endpoint, topic, timeout_s=timeout_s, stats=stats, status=status)
