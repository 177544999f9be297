"""Where records go: a ZeroMQ publisher, a JSON-lines file (or stdout), or a Python callback.

Every sink has ``send(record)`` (frame records), ``send_status(status)`` (status records) and
``close()``; :class:`Sinks` fans a stream's records out to all of them, and :func:`open_sinks`
opens the ones ``rrise run`` asks for. None of them may stall inference: the publisher never blocks.

Back-pressure policy of the publisher (the project's choice): ZeroMQ keeps one outgoing queue per
subscriber, ``hwm`` messages deep. A subscriber that stalls fills only its own queue; from then on
*that* subscriber loses new records (ZeroMQ drops them silently, and PUB gives no per-subscriber
count) while every other subscriber and inference go on untouched. Records a subscriber lost show
up on its side as gaps in ``seq``. Capture-side drops — frames a live source produced faster than
inference could take them — are counted separately by the runner (``drops`` in its summary and
status records). ``nodrop=True`` is there for the rare consumer that prefers the publisher to
fail sends (counted in :attr:`ZmqPublisher.drops`) over losing records silently; it makes a
stalled subscriber cost every subscriber, so it is off by default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import zmq

from rrise.records import DEFAULT_TOPIC, pack, status_topic

__all__ = ["CallbackSink", "JsonlSink", "SinkError", "Sinks", "ZmqPublisher", "open_sinks"]

log = logging.getLogger("rrise.runtime")


class SinkError(RuntimeError):
    """A sink that cannot be opened (e.g. an endpoint already bound)."""


class ZmqPublisher:
    """Publishes records as ZeroMQ multipart ``[topic, msgpack(record)]`` on a bound XPUB socket.

    ``endpoint`` is what to bind, e.g. ``tcp://*:5555``, ``tcp://127.0.0.1:*`` (any free port: read
    :attr:`endpoint` back) or ``ipc:///tmp/rrise.sock``. XPUB (rather than PUB) lets
    :meth:`wait_for_subscribers` see subscriptions arrive, so a run can wait for its consumers
    before the first frame.

    Back-pressure: ``send`` never blocks. With ``nodrop=False`` (the default) a subscriber whose
    queue holds ``hwm`` records loses the newest ones while the others still get them; ZeroMQ
    drops those silently, so :attr:`drops` counts only sends that failed outright. With
    ``nodrop=True`` a full subscriber queue makes the send fail for every subscriber, and each
    such record is counted in :attr:`drops`. Not thread-safe: send from one thread.
    """

    def __init__(
        self,
        endpoint: str,
        topic: bytes | str = DEFAULT_TOPIC,
        hwm: int = 1000,
        *,
        linger_ms: int = 200,
        nodrop: bool = False,
    ) -> None:
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self.status_topic = status_topic(self.topic)
        self.drops = 0
        self.sent = 0
        self._subscriptions: dict[bytes, int] = {}
        self._closed = False
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.XPUB)
        try:
            self._sock.setsockopt(zmq.SNDHWM, int(hwm))
            self._sock.setsockopt(zmq.LINGER, int(linger_ms))
            self._sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, duplicates too
            if nodrop:
                self._sock.setsockopt(zmq.XPUB_NODROP, 1)
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise SinkError(f"cannot publish on {endpoint}: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def subscribers(self) -> int:
        """Live subscriptions that match this publisher's topic."""
        self._drain()
        return sum(n for prefix, n in self._subscriptions.items() if self.topic.startswith(prefix))

    def _drain(self) -> None:
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not msg or msg[0] not in (0, 1):
                continue
            prefix = msg[1:]
            n = self._subscriptions.get(prefix, 0) + (1 if msg[0] == 1 else -1)
            self._subscriptions[prefix] = max(n, 0)

    def wait_for_subscribers(self, n: int, timeout_s: float) -> int:
        """Wait until ``n`` subscriptions match the topic, or ``timeout_s``; return how many do."""
        deadline = time.monotonic() + max(float(timeout_s), 0.0)
        while True:
            have = self.subscribers
            left = deadline - time.monotonic()
            if have >= n or left <= 0:
                return have
            self._sock.poll(min(left, 0.1) * 1000, zmq.POLLIN)

    def send(self, record: dict[str, Any]) -> bool:
        """Queue one record without blocking; False (and one more drop) if it could not be queued."""
        try:
            self._sock.send_multipart([self.topic, pack(record)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.drops += 1
            return False
        self.sent += 1
        return True

    def send_status(self, status: dict[str, Any]) -> bool:
        """Queue one status record on :attr:`status_topic` (``<topic>.status``), never blocking."""
        try:
            self._sock.send_multipart([self.status_topic, pack(status)], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> ZmqPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink:
    """One JSON object per line to ``path`` (created or truncated) or to stdout for ``"-"``."""

    def __init__(self, path_or_dash: str | os.PathLike) -> None:
        self.path = str(path_or_dash)
        self._own = self.path != "-"
        if self._own:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        else:
            self._file = sys.stdout
        self._closed = False

    def send(self, record: dict[str, Any]) -> None:
        """Write and flush one line; a closed stdout pipe raises BrokenPipeError (stop the run)."""
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def send_status(self, status: dict[str, Any]) -> None:
        """Status records are not written: the file holds exactly one line per frame."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._own:
            self._file.close()
            return
        try:
            self._file.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): point stdout at /dev/null so exit does not complain.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._file.fileno())
                os.close(devnull)

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallbackSink:
    """Calls ``fn(record)`` for each frame record and ``on_status(status)`` for each status record
    (either may be None)."""

    def __init__(
        self,
        fn: Callable[[dict[str, Any]], Any] | None,
        on_status: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.fn = fn
        self.on_status = on_status

    def send(self, record: dict[str, Any]) -> None:
        if self.fn is not None:
            self.fn(record)

    def send_status(self, status: dict[str, Any]) -> None:
        if self.on_status is not None:
            self.on_status(status)

    def close(self) -> None:
        pass


class Sinks:
    """Every sink of one stream: frame records go to each ``send``, status records (``kind ==
    "status"``) to each ``send_status``, in order. A sink that raises stops the fan-out of that
    record (a closed stdout raises BrokenPipeError: the caller ends the stream)."""

    def __init__(self, sinks: Sequence[Any] = ()) -> None:
        self.sinks = list(sinks)

    def send(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "status":
            for sink in self.sinks:
                sink.send_status(record)
        else:
            for sink in self.sinks:
                sink.send(record)

    @property
    def publish_failed(self) -> int:
        """Records the publishers could not queue at all."""
        return sum(s.drops for s in self.sinks if isinstance(s, ZmqPublisher))

    def close(self) -> None:
        """Close every sink; one that fails to close is logged and does not keep the others open."""
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.warning("closing %s failed", type(sink).__name__, exc_info=True)

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sinks(
    *,
    publish: str | None = None,
    jsonl: str | os.PathLike | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    on_status: Callable[[dict[str, Any]], Any] | None = None,
    topic: bytes | str = DEFAULT_TOPIC,
    hwm: int = 1000,
    wait_subscribers: int = 0,
    wait_timeout_s: float = 5.0,
) -> Sinks:
    """The sinks a run asks for: a ZeroMQ ``publish`` endpoint to bind (records on ``topic``, status
    records on ``<topic>.status``; never blocks: a subscriber ``hwm`` records behind loses records),
    a ``jsonl`` path (``-``: stdout, flushed per line), a ``callback`` per record and ``on_status``
    per status record. With ``wait_subscribers=n`` it waits up to ``wait_timeout_s`` for ``n``
    subscribers before returning."""
    sinks = Sinks()
    try:
        if publish:
            publisher = ZmqPublisher(publish, topic=topic, hwm=hwm)
            sinks.sinks.append(publisher)
            if wait_subscribers > 0:
                got = publisher.wait_for_subscribers(wait_subscribers, wait_timeout_s)
                if got < wait_subscribers:
                    log.warning(
                        "%d of %d subscriber(s) after %.1f s; starting anyway",
                        got,
                        wait_subscribers,
                        wait_timeout_s,
                    )
        if jsonl:
            sinks.sinks.append(JsonlSink(jsonl))
        if callback is not None or on_status is not None:
            sinks.sinks.append(CallbackSink(callback, on_status))
    except BaseException:
        sinks.close()
        raise
    return sinks
