"""Where records go: a ZeroMQ publisher, a JSON-lines file (or stdout), or a Python callback.

Every sink is a :class:`Sink`: ``send(record)`` (frame records), ``send_status(status)`` (status
records) and ``close()``; :class:`Sinks` fans a stream's records out to all of them (refusing, when
it is made, an object that lacks one of the three), and :func:`open_sinks` opens the ones ``rrise
run`` asks for (:class:`~rrise.runtime.options.OutputOptions`). None of them may stall inference:
the publisher never blocks.

Back-pressure policy of the publisher (the project's choice): ZeroMQ keeps one outgoing queue per
subscriber, ``hwm`` messages deep. A subscriber that stalls fills only its own queue; from then on
*that* subscriber loses new records (ZeroMQ drops them silently, and PUB gives no per-subscriber
count) while every other subscriber and inference go on untouched. Records a subscriber lost show
up on its side as gaps in ``seq``. Capture-side drops — frames a live source produced faster than
inference could take them — are counted separately by the runner (``drops`` in its summary and
status records). ``nodrop=True`` is there for the rare consumer that prefers the publisher to
fail sends (counted in :attr:`ZmqPublisher.drops`) over losing records silently; it makes a
stalled subscriber cost every subscriber, so it is off by default.

What the publisher can and cannot know about delivery: XPUB reports every (un)subscription
(``XPUB_VERBOSER``), never a delivery. So :class:`ZmqPublisher` counts subscriptions over time (now,
peak, ever seen), records sent while at least one subscription was live (each *may* have reached
those subscribers; one that fell ``hwm`` behind still lost it, which only its own ``seq`` gaps
show), records sent while none was (``unheard``: lost for sure) and their sum over subscriptions
(``offered``: an upper bound on records delivered, summed over subscribers). :meth:`Sinks.warnings`
turns those into the sentences a run ends with, e.g. "0 of 60 records reached a subscriber".

Write errors (a full disk, a removed drive): a sink that fails to write raises :class:`SinkError`
naming its output (``--jsonl runs/x.jsonl: No space left on device``); :class:`Sinks` keeps every
such message, those of closing too, in :attr:`Sinks.errors`, and ``rrise run`` ends with exit 1
and each message. A closed stdout pipe is not an error (``| head``): it stops the run quietly.
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
from typing import IO, Any, Protocol, runtime_checkable

import zmq

from rrise.records import DEFAULT_TOPIC, pack, status_topic

from .options import OutputOptions

__all__ = ["CallbackSink", "JsonlSink", "Sink", "SinkError", "Sinks", "ZmqPublisher", "open_sinks"]

log = logging.getLogger("rrise.runtime")

NO_OUTPUT_HINT = "give --publish ENDPOINT or --jsonl PATH, or --no-output if that is what you mean"


class SinkError(RuntimeError):
    """A sink that cannot be opened (e.g. an endpoint already bound)."""


@runtime_checkable
class Sink(Protocol):
    """Where a stream's records go. ``send`` takes each frame record and ``send_status`` each
    status record (``kind == "status"``; a sink with no use for them does nothing), both as plain
    dicts and never blocking inference for long; ``close`` flushes and releases (called once, at
    the end, also after a failure). A sink that raises stops the fan-out of that record
    (BrokenPipeError: the run ends quietly)."""

    def send(self, record: dict[str, Any]) -> Any: ...

    def send_status(self, status: dict[str, Any]) -> Any: ...

    def close(self) -> None: ...


class ZmqPublisher:
    """Publishes records as ZeroMQ multipart ``[topic, msgpack(record)]`` on a bound XPUB socket.

    ``endpoint`` is what to bind, e.g. ``tcp://192.168.1.10:5555`` (one interface),
    ``tcp://127.0.0.1:*`` (any free port: read :attr:`endpoint` back) or ``ipc:///tmp/rrise.sock``.
    XPUB (rather than PUB) lets :meth:`wait_for_subscribers` see subscriptions arrive, so a run can
    wait for its consumers before the first frame. ``curve_secret``: a ``.curve.key`` file
    (:func:`rrise.curve.write_curve_keypair`); the socket becomes a CURVE server, so records are
    encrypted and only reach subscribers that hold its public key. Binding every interface
    (``tcp://*``) without it logs a warning.

    Back-pressure: ``send`` never blocks. With ``nodrop=False`` (the default) a subscriber whose
    queue holds ``hwm`` records loses the newest ones while the others still get them; ZeroMQ
    drops those silently, so :attr:`drops` counts only sends that failed outright. With
    ``nodrop=True`` a full subscriber queue makes the send fail for every subscriber, and each
    such record is counted in :attr:`drops`. Not thread-safe: send from one thread.

    Delivery counts (see the module docstring for what they mean): :attr:`sent`,
    :attr:`sent_unheard`, :attr:`offered`, :attr:`subscribers_peak`, :attr:`subscriptions_seen`.
    """

    def __init__(
        self,
        endpoint: str,
        topic: bytes | str = DEFAULT_TOPIC,
        hwm: int = 1000,
        *,
        linger_ms: int = 200,
        nodrop: bool = False,
        curve_secret: str | os.PathLike | None = None,
    ) -> None:
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self.status_topic = status_topic(self.topic)
        self.drops = self.sent = self.sent_unheard = self.offered = 0
        self.subscribers_peak = self.subscriptions_seen = 0
        self.curve = curve_secret is not None
        self._subscriptions: dict[bytes, int] = {}
        self._closed = False
        options = _curve_server(curve_secret) if curve_secret is not None else {}
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.XPUB)
        try:
            for option, value in options.items():
                self._sock.setsockopt(option, value)
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
        if not self.curve and _every_interface(endpoint):
            log.warning(
                "publishing on every interface (%s) without encryption or authentication: bind one "
                "interface (e.g. tcp://127.0.0.1:PORT) or pass --curve-secret",
                endpoint,
            )

    @property
    def subscribers(self) -> int:
        """Live subscriptions that match this publisher's topic (a subscriber that subscribes
        twice counts twice)."""
        self._drain()
        return self._matching()

    def _matching(self) -> int:
        return sum(n for prefix, n in self._subscriptions.items() if self.topic.startswith(prefix))

    def _drain(self) -> None:
        sock = self._sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not msg or msg[0] not in (0, 1):
                continue
            prefix = msg[1:]
            joined = msg[0] == 1
            n = self._subscriptions.get(prefix, 0) + (1 if joined else -1)
            self._subscriptions[prefix] = max(n, 0)
            if joined and self.topic.startswith(prefix):
                self.subscriptions_seen += 1
        self.subscribers_peak = max(self.subscribers_peak, self._matching())

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
        listening = self.subscribers
        try:
            self._sock.send_multipart([self.topic, pack(record)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.drops += 1
            return False
        self.sent += 1
        self.offered += listening
        if not listening:
            self.sent_unheard += 1
        return True

    def send_status(self, status: dict[str, Any]) -> bool:
        """Queue one status record on :attr:`status_topic` (``<topic>.status``), never blocking."""
        try:
            self._sock.send_multipart([self.status_topic, pack(status)], flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def delivery(self) -> dict[str, Any]:
        """The delivery counts so far: ``endpoint``, ``subscribers`` (now), ``subscribers_peak``,
        ``subscriptions_seen``, ``published`` (records queued), ``published_unheard`` (queued while
        no subscription matched: lost for sure), ``published_offered`` (Σ matching subscriptions
        per record: at most this many deliveries), ``publish_failed``."""
        return {
            "endpoint": self.endpoint,
            "subscribers": self.subscribers if not self._closed else self._matching(),
            "subscribers_peak": self.subscribers_peak,
            "subscriptions_seen": self.subscriptions_seen,
            "published": self.sent,
            "published_unheard": self.sent_unheard,
            "published_offered": self.offered,
            "publish_failed": self.drops,
        }

    def close(self) -> None:
        if not self._closed:
            self._drain()
            self._closed = True
            self._sock.close()

    def __enter__(self) -> ZmqPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _every_interface(endpoint: str) -> bool:
    host = endpoint.partition("://")[2].rpartition(":")[0]
    return endpoint.startswith("tcp://") and host in ("*", "0.0.0.0", "[::]", "::", "[*]")


def _curve_server(secret_file: str | os.PathLike) -> dict[int, Any]:
    from rrise.curve import CurveKeyError, curve_server_options

    try:
        return curve_server_options(secret_file)
    except CurveKeyError as exc:
        raise SinkError(f"--curve-secret: {exc}") from None


class JsonlSink:
    """One JSON object per line to ``path`` (created or truncated) or to stdout for ``"-"``."""

    def __init__(self, path_or_dash: str | os.PathLike) -> None:
        self.path = str(path_or_dash)
        self.name = f"--jsonl {self.path}"
        self._own = self.path != "-"
        self._file: IO[str] = _open_jsonl(Path(self.path)) if self._own else sys.stdout
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


def _open_jsonl(path: Path) -> IO[str]:
    """``path`` opened for writing (its folder made if need be), or a SinkError saying why not."""
    if path.is_dir():
        raise SinkError(
            f"cannot write records to {path}: it is a folder; give a file, e.g. {path}/records.jsonl"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by JsonlSink.close
    except OSError as exc:
        raise SinkError(f"cannot write records to {path}: {exc.strerror or exc}") from None


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
    record (a closed stdout raises BrokenPipeError: the caller ends the stream).

    Parameters
    ----------
    sinks:
        :class:`Sink` objects, in the order records reach them.

    Raises
    ------
    TypeError
        An object that is not a :class:`Sink`, naming what it lacks (:meth:`add`).

    >>> class Printer:
    ...     def send(self, record): print("record", record["seq"])
    ...     def send_status(self, status): print("status")
    ...     def close(self): print("closed")
    >>> with Sinks([Printer()]) as sinks:
    ...     sinks.send({"seq": 3})
    ...     sinks.send({"kind": "status"})
    record 3
    status
    closed
    >>> class OnlySend:
    ...     def send(self, record): pass
    >>> try:
    ...     Sinks([OnlySend()])
    ... except TypeError as exc:
    ...     print(exc)
    OnlySend is not a sink: it lacks send_status, close
    """

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks: list[Sink] = []
        self.errors: list[str] = []  # write and close errors, each naming its output
        self._closed = False
        for sink in sinks:
            self.add(sink)

    def add(self, sink: Sink) -> None:
        """One more sink, after the others."""
        if not isinstance(sink, Sink):
            missing = [m for m in ("send", "send_status", "close") if not callable(getattr(sink, m, None))]
            raise TypeError(f"{type(sink).__name__} is not a sink: it lacks {', '.join(missing)}")
        self.sinks.append(sink)

    def send(self, record: dict[str, Any]) -> None:
        """``record`` to every sink, in order. A write error (OSError, but not a closed pipe) becomes
        a :class:`SinkError` naming the sink, kept in :attr:`errors`; it stops the fan-out."""
        status = record.get("kind") == "status"
        for sink in self.sinks:
            try:
                sink.send_status(record) if status else sink.send(record)
            except BrokenPipeError:
                raise
            except SinkError as exc:
                self._error(str(exc))
                raise
            except OSError as exc:
                message = write_error(sink_name(sink), exc)
                self._error(message)
                raise SinkError(message) from None

    @property
    def publish_failed(self) -> int:
        """Records the publishers could not queue at all."""
        return sum(s.drops for s in self.sinks if isinstance(s, ZmqPublisher))

    @property
    def publishers(self) -> list[ZmqPublisher]:
        return [s for s in self.sinks if isinstance(s, ZmqPublisher)]

    def delivery(self) -> dict[str, Any]:
        """The :data:`rrise.records.DELIVERY_KEYS` for status records and the run summary, summed
        over the publishers (all None without one); ``publishers`` lists each one's
        :meth:`ZmqPublisher.delivery`."""
        pubs = [p.delivery() for p in self.publishers]
        keys = ("subscribers", "subscribers_peak", "published", "published_unheard", "published_offered")
        totals = {k: (sum(p[k] for p in pubs) if pubs else None) for k in keys}
        return {**totals, "publishers": pubs}

    def warnings(self, frames: int) -> list[str]:
        """What a user must hear about where ``frames`` records went: none anywhere, or none (or
        not all) reaching a subscriber."""
        if not self.sinks:
            return [f"no output: {frames} record(s) were certified and discarded ({NO_OUTPUT_HINT})"]
        said = []
        for p in (p.delivery() for p in self.publishers):
            sent, unheard, where = p["published"], p["published_unheard"], p["endpoint"]
            if sent and p["subscribers_peak"] == 0:
                said.append(
                    f"0 of {sent} record(s) reached a subscriber on {where}: none was connected "
                    "(start subscribers first and pass --wait-subscribers N)"
                )
            elif unheard:
                said.append(
                    f"{unheard} of {sent} record(s) were published on {where} while no subscriber was "
                    "connected, and are lost (--wait-subscribers N waits for subscribers first)"
                )
            if p["publish_failed"]:
                said.append(f"{p['publish_failed']} record(s) could not be queued on {where}")
        return said

    def close(self) -> None:
        """Close every sink (once); one that fails to close does not keep the others open, and its
        message joins :attr:`errors` (a file that could not be finished is an output error)."""
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            try:
                sink.close()
            except BrokenPipeError:
                continue
            except (SinkError, OSError, ValueError) as exc:
                message = write_error(sink_name(sink), exc) if isinstance(exc, OSError) else str(exc)
                self._error(message)
            except Exception as exc:  # a sink's own bug: said, never a silent loss
                self._error(f"closing {sink_name(sink)} failed: {exc}")

    def _error(self, message: str) -> None:
        """Keep ``message`` once per output (closing a file that could not be written usually fails
        the same way again)."""
        for part in message.split("; "):
            if part not in self.errors:
                self.errors.append(part)

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_error(name: str, exc: OSError) -> str:
    """The one-line message of an output ``name`` that failed with ``exc`` (``--jsonl x.jsonl: No
    space left on device``)."""
    return f"{name}: {exc.strerror or exc}"


def sink_name(sink: object) -> str:
    """How messages name ``sink``: its ``name`` (e.g. ``--jsonl runs/x.jsonl``), else its type."""
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) and name else type(sink).__name__


def open_sinks(
    options: OutputOptions | None = None,
    *,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    on_status: Callable[[dict[str, Any]], Any] | None = None,
    frames: Sink | None = None,
) -> Sinks:
    """The sinks ``options`` ask for, in this order: a ZeroMQ publisher bound to ``publish``
    (records on ``topic``, status records on ``<topic>.status``; never blocks: a subscriber ``hwm``
    records behind loses records; ``curve_secret``: encrypt as a CURVE server; with
    ``wait_subscribers=n`` it waits up to ``wait_timeout`` s for ``n`` subscribers before
    returning), a ``jsonl`` file (``-``: stdout, flushed per line), a ``callback`` per record and
    ``on_status`` per status record, and ``frames`` (the
    :class:`~rrise.runtime.frame_outputs.FrameSink` of the video, recording and live view).

    Parameters
    ----------
    options:
        :class:`~rrise.runtime.options.OutputOptions` (default: no publisher, no file).
    callback, on_status:
        Called with each frame record / status record.
    frames:
        The frame outputs' sink, last.

    Returns
    -------
    Sinks
        Close it (or use it as a context manager) when done.

    Raises
    ------
    SinkError
        A sink that cannot be opened, naming the endpoint, file or key file.

    >>> with open_sinks(callback=print) as sinks:
    ...     sinks.send({"seq": 0})
    {'seq': 0}
    """
    options = options or OutputOptions()
    sinks = Sinks()
    try:
        if options.publish:
            publisher = ZmqPublisher(
                options.publish, topic=options.topic, hwm=options.hwm, curve_secret=options.curve_secret
            )
            sinks.add(publisher)
            _wait_for_subscribers(publisher, options.wait_subscribers, options.wait_timeout)
        if options.jsonl:
            sinks.add(JsonlSink(options.jsonl))
        if callback is not None or on_status is not None:
            sinks.add(CallbackSink(callback, on_status))
        if frames is not None:
            sinks.add(frames)
    except BaseException:
        sinks.close()
        raise
    return sinks


def _wait_for_subscribers(publisher: ZmqPublisher, wanted: int, timeout: float) -> None:
    if wanted > 0:
        log.info("waiting up to %.1f s for %d subscriber(s)", timeout, wanted)
        got = publisher.wait_for_subscribers(wanted, timeout)
        if got < wanted:
            log.warning("%d of %d subscriber(s) after %.1f s; starting anyway", got, wanted, timeout)
