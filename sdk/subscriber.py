"""Subscriber client: ``rrise.subscribe(endpoint)`` yields validated records from a runtime.

pyzmq is imported when a subscription is opened, so ``import rrise`` does not need it. The SUB
socket connects (ZeroMQ reconnects by itself, with backoff up to ``reconnect_ivl_max_ms``, if the
publisher restarts or the link drops), and every message is checked against the typed schema of
:mod:`rrise.records`: anything that is not a ``[topic, msgpack record]`` with every value of the
right type and range is skipped and counted, never yielded. Status records (topic
``<topic>.status``) are yielded only with ``status=True``; otherwise they are counted and skipped.

Memory is bounded: a message larger than ``max_message_bytes`` (16 KiB by default; a record is a
few hundred bytes) is refused by ZeroMQ before it is read (``MAXMSGSIZE``), which closes that
connection; the subscription then connects again by itself, and ``stats["disconnects"]`` counts it.
At most ``rcvhwm`` messages (10,000 by default) wait in the socket's queue: with the size cap,
about 160 MiB at worst, and a subscriber that falls behind a burst by fewer records loses none.

``stats["missed"]`` counts records lost on the way (gaps in ``seq``, per ``source`` and ``bundle``:
e.g. the publisher dropped records for this subscriber when it fell ``hwm`` behind). A ``seq`` that
goes backwards, repeats, or jumps ahead by more than ``max_gap`` is a new stream (a publisher that
restarted, or a record that lies about its ``seq``): counted in ``stats["restarts"]``, never as
billions of missed records.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from .records import (
    DEFAULT_TOPIC,
    RECORD_VERSION,
    STATUS_SUFFIX,
    RecordError,
    status_topic,
    unpack,
    unpack_status,
)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Subscription", "check_endpoint", "subscribe"]

log = logging.getLogger("rrise.subscriber")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024
DEFAULT_MAX_GAP = 1_000_000  # a seq jump beyond this is a new stream, not missed records
_POLL_MS = 200  # poll in slices so Ctrl-C and close() are noticed promptly
_MAX_STREAMS = 1024  # (source, bundle) pairs whose last seq is remembered
_STAT_KEYS = (
    "received",
    "malformed",
    "unsupported_version",
    "status",
    "missed",
    "restarts",
    "connects",
    "disconnects",
    "handshake_failures",
)
_TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "tipc", "vmci", "ws", "wss")
_ENDPOINT = re.compile(r"^([a-z]+)://(.+)$")


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if a subscriber can connect to it, else a ValueError saying what to give."""
    example = "e.g. tcp://127.0.0.1:5555, tcp://robot:5555 or ipc:///tmp/rrise.sock"
    m = _ENDPOINT.match(str(endpoint))
    if m is None or m.group(1) not in _TRANSPORTS:
        raise ValueError(f"{endpoint!r} is not a ZeroMQ endpoint to connect to ({example})")
    if m.group(1) == "tcp":
        host, _, port = m.group(2).rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "::") or port == "*":
            raise ValueError(
                f"{endpoint} is an address a publisher binds; connect to the publisher's host and "
                f"port instead ({example})"
            )
        if not host or not port.isdigit():
            raise ValueError(f"{endpoint!r} needs a host and a port number ({example})")
    return endpoint


class Subscription:
    """An open SUB socket; iterate it for records. ``stats`` counts ``received`` (records yielded),
    ``malformed`` (messages skipped, for any reason: not msgpack, a key missing, a value of the
    wrong type or range), ``unsupported_version`` (those among the malformed that carried another
    schema version), ``status`` (status records seen), ``missed`` (frame records lost on the way,
    from gaps in ``seq``), ``restarts`` (new streams: ``seq`` went back or jumped past ``max_gap``),
    ``connects``, ``disconnects`` and ``handshake_failures`` (a CURVE key that does not match).
    ``curve_server_key``: the publisher's ``.curve.pub`` file; the link is then encrypted and only
    that publisher is accepted. Use as a context manager or call ``close()``."""

    # ZeroMQ's reconnect interval (doubling up to the max) and receive queue depth, in messages.
    reconnect_ivl_ms = 100
    reconnect_ivl_max_ms = 1000
    rcvhwm = 10_000

    def __init__(
        self,
        endpoint: str,
        topic: bytes | str = DEFAULT_TOPIC,
        *,
        timeout_s: float | None = None,
        stats: dict[str, int] | None = None,
        status: bool = False,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        max_gap: int = DEFAULT_MAX_GAP,
        curve_server_key: str | Path | None = None,
    ) -> None:
        try:
            import zmq
        except ImportError as exc:
            raise RuntimeError("subscribing needs pyzmq: pip install 'rrise[runtime]'") from exc
        self._zmq = zmq
        self.endpoint = check_endpoint(endpoint)
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self.status_topic = status_topic(self.topic)
        self.want_status = bool(status)
        self.timeout_s = timeout_s
        self.max_gap = int(max_gap)
        self.curve = curve_server_key is not None
        self.stats = stats if stats is not None else {}
        for key in _STAT_KEYS:
            self.stats.setdefault(key, 0)
        self._last_seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._reconnect_after_s = 2 * self.reconnect_ivl_ms / 1000 + 0.1
        options = _socket_options(
            zmq, self.rcvhwm, self.reconnect_ivl_ms, self.reconnect_ivl_max_ms, max_message_bytes
        )
        if curve_server_key is not None:
            from .curve import curve_client_options

            options.update(curve_client_options(curve_server_key))
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._monitor = None
        try:
            for option, value in options.items():
                self._sock.setsockopt(option, value)
            self._sock.setsockopt(zmq.SUBSCRIBE, self.topic)
            self._monitor = self._sock.get_monitor_socket()
            self._sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sock.close(linger=0)
            raise ValueError(f"cannot subscribe to {endpoint!r}: {exc}") from None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._dropped_at: float | None = None  # a connection closed and nothing since
        self._closed = False
        self._warned: set[str] = set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        zmq = self._zmq
        if self._closed:
            raise StopIteration
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._watch_connection()
                wait_ms = _POLL_MS
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.close()
                        raise StopIteration from None
                    wait_ms = max(1, min(_POLL_MS, int(left * 1000)))
                self._poller.poll(wait_ms)
                continue
            self._watch_connection()  # after the message: the events that came before it are counted
            if deadline is not None:  # any message, even a bad one, means the link is alive
                deadline = time.monotonic() + self.timeout_s
            record = self._parse(parts)
            if record is not None:
                self.stats["received"] += 1
                return record

    # --- the connection ---------------------------------------------------------------------
    def _watch_connection(self) -> None:
        """Count connection events; reconnect by hand when ZeroMQ will not (a refused message)."""
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.stats["connects"] += 1
                self._dropped_at = None
            elif event == zmq.EVENT_DISCONNECTED:
                self.stats["disconnects"] += 1
                self._dropped_at = time.monotonic()
            elif event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_DELAYED):
                self._dropped_at = None  # ZeroMQ is reconnecting by itself
            elif event & _handshake_failed(zmq):
                self.stats["handshake_failures"] += 1
                self._warn_handshake()
        # A message over MAXMSGSIZE (or a security mechanism mismatch) ends the session for good:
        # ZeroMQ does not reconnect it, so a closed connection with no retry scheduled is redone.
        if self._dropped_at is not None and time.monotonic() - self._dropped_at > self._reconnect_after_s:
            self._dropped_at = None
            log.info(
                "connection to %s closed and not retried by ZeroMQ (a message over the size cap, or a "
                "failed handshake): connecting again",
                self.endpoint,
            )
            self._sock.disconnect(self.endpoint)
            self._sock.connect(self.endpoint)

    def _warn_handshake(self) -> None:
        if "handshake" in self._warned:
            return
        self._warned.add("handshake")
        hint = (
            "the --curve-server-key is not this publisher's, or it does not use CURVE"
            if self.curve
            else "the publisher uses CURVE: give its public key (--curve-server-key FILE)"
        )
        log.warning("security handshake with %s failed: %s", self.endpoint, hint)

    # --- the messages -----------------------------------------------------------------------
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
            self._count_malformed(parts[1], exc)
            return None
        self._count_gap(record)
        return record

    def _count_malformed(self, payload: bytes, exc: RecordError) -> None:
        self.stats["malformed"] += 1
        other = _other_version(payload)
        if other:
            self.stats["unsupported_version"] += 1
        key = "version" if other else "malformed"
        if key not in self._warned:  # say it once: a stream of bad records must not flood the log
            self._warned.add(key)
            extra = f" (this rrise reads v{RECORD_VERSION}; upgrade one side)" if other else ""
            log.warning("skipping records from %s: %s%s", self.endpoint, exc, extra)

    def _count_gap(self, record: dict[str, Any]) -> None:
        seq = record["seq"]
        key = (record["source"], record["bundle"])
        last = self._last_seq.pop(key, None)
        self._last_seq[key] = seq
        if len(self._last_seq) > _MAX_STREAMS:
            self._last_seq.popitem(last=False)
        if last is None:
            return
        gap = seq - last - 1
        if 0 <= gap <= self.max_gap:
            self.stats["missed"] += gap
        else:  # back, repeated, or absurdly far ahead: a new stream, not lost records
            self.stats["restarts"] += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The same order as close(): a monitored socket closed while its monitor still runs can
        # leave the context's reaper waiting on the monitor, and every later close in the process
        # with it (a publisher that never lets go of its port).
        if not getattr(self, "_closed", True):
            self.close()


def _socket_options(
    zmq: Any, rcvhwm: int, ivl_ms: int, ivl_max_ms: int, max_bytes: int | None
) -> dict[int, Any]:
    if max_bytes is not None and int(max_bytes) < 1024:
        raise ValueError(
            f"max_message_bytes must be >= 1024 (a record is a few hundred bytes), got {max_bytes}"
        )
    return {
        zmq.LINGER: 0,
        zmq.RCVHWM: int(rcvhwm),
        zmq.RECONNECT_IVL: int(ivl_ms),
        zmq.RECONNECT_IVL_MAX: int(ivl_max_ms),
        zmq.MAXMSGSIZE: -1 if max_bytes is None else int(max_bytes),
    }


def _handshake_failed(zmq: Any) -> int:
    return (
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )


def _other_version(payload: bytes) -> bool:
    """Whether a rejected payload is a well-formed map of another schema version."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return False
    return isinstance(obj, dict) and "v" in obj and obj["v"] != RECORD_VERSION


def subscribe(
    endpoint: str,
    topic: bytes | str = DEFAULT_TOPIC,
    *,
    timeout_s: float | None = None,
    stats: dict[str, int] | None = None,
    status: bool = False,
    max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    curve_server_key: str | Path | None = None,
    max_gap: int = DEFAULT_MAX_GAP,
) -> Subscription:
    """Connect to ``endpoint`` and yield validated records published on ``topic``.

    Parameters
    ----------
    endpoint:
        The publisher's address, e.g. ``tcp://127.0.0.1:5555`` (not a bind address such as
        ``tcp://*:5555``).
    topic:
        The records' topic (``rrise run --topic``); status records come on ``<topic>.status``.
    timeout_s:
        Stop when this long passes without any message (None: never).
    stats:
        A dict to count into (:class:`Subscription`: ``received``, ``malformed``,
        ``unsupported_version``, ``status``, ``missed``, ``restarts``, ``connects``…).
    status:
        Yield the runtime's periodic status records (``kind == "status"``) too.
    max_message_bytes:
        Refuse larger messages unread (None: no cap).
    curve_server_key:
        The publisher's ``.curve.pub``: the link is encrypted and only that publisher accepted.
    max_gap:
        A ``seq`` jump beyond this is a new stream, not missed records.

    Returns
    -------
    Subscription
        An iterator of record dicts (:data:`rrise.records.RECORD_KEYS`), connected when this
        returns (so a publisher can wait for it); close it, or use it as a context manager.

    Messages that fail the record schema and records of another schema version are skipped and
    counted, never yielded. ZeroMQ reconnects by itself when the publisher restarts. Raises
    ValueError for an endpoint one cannot connect to or a bad key file.

    >>> stats = {}
    >>> with subscribe("tcp://127.0.0.1:45999", timeout_s=0.2, stats=stats) as records:
    ...     got = list(records)
    >>> got, stats["received"], stats["malformed"]
    ([], 0, 0)
    """
    return Subscription(
        endpoint,
        topic,
        timeout_s=timeout_s,
        stats=stats,
        status=status,
        max_message_bytes=max_message_bytes,
        curve_server_key=curve_server_key,
        max_gap=max_gap,
    )
