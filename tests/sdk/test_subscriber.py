"""ZeroMQ publisher ↔ ``rrise.subscribe``: round trips over tcp and ipc, malformed messages, timeouts."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

import rrise
from rrise.certificate import Certificate
from rrise.records import DEFAULT_TOPIC, pack
from rrise.runtime.sinks import SinkError, ZmqPublisher
from rrise.subscriber import subscribe
from tests.runtime_fixtures import record_of


def record(seq: int, *, error: str | None = None) -> dict:
    cert = Certificate(
        top_class=seq % 3, abstain=seq % 2 == 1, radius=0.1 * (seq % 2 == 0), score=0.9, p_lower=0.8
    )
    return record_of(
        seq, None if error else cert, labels=["a", "b", "c"], error=error, source="test", bundle="b" * 16
    )


class Collector(threading.Thread):
    """Subscribes in its own thread (ZeroMQ sockets belong to one thread) and gathers ``n`` records."""

    def __init__(self, endpoint: str, n: int, topic: bytes | str = DEFAULT_TOPIC, timeout_s: float = 5.0):
        super().__init__(daemon=True)
        self.endpoint, self.n, self.topic, self.timeout_s = endpoint, n, topic, timeout_s
        self.records: list[dict] = []
        self.stats: dict = {}
        self.ready = threading.Event()

    def run(self) -> None:
        sub = subscribe(self.endpoint, self.topic, timeout_s=self.timeout_s, stats=self.stats)
        self.ready.set()
        for rec in sub:
            self.records.append(rec)
            if len(self.records) >= self.n:
                break
        sub.close()


def round_trip(endpoint: str) -> None:
    with ZmqPublisher(endpoint) as pub:
        sub = Collector(pub.endpoint, 20)
        sub.start()
        assert pub.wait_for_subscribers(1, timeout_s=5) >= 1
        sent = [record(i, error="bad frame" if i == 7 else None) for i in range(20)]
        for r in sent:
            assert pub.send(r)
        sub.join(10)
    assert not sub.is_alive()
    assert sub.records == sent
    assert sub.stats["received"] == 20 and sub.stats["malformed"] == 0
    assert pub.sent == 20 and pub.drops == 0


def test_round_trip_over_tcp_on_a_free_port() -> None:
    round_trip("tcp://127.0.0.1:*")


def test_round_trip_over_ipc(tmp_path: Path) -> None:
    folder = tmp_path if len(str(tmp_path)) < 80 else Path(tempfile.mkdtemp())  # sun_path is short
    round_trip(f"ipc://{folder / 'rrise.sock'}")


def test_publisher_endpoint_reports_the_bound_port() -> None:
    with ZmqPublisher("tcp://127.0.0.1:*") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and int(pub.endpoint.rsplit(":", 1)[1]) > 0
        with pytest.raises(SinkError, match="cannot publish"):
            ZmqPublisher(pub.endpoint)  # already bound


def test_wait_for_subscribers_times_out_and_counts() -> None:
    with ZmqPublisher("tcp://127.0.0.1:*") as pub:
        t0 = time.monotonic()
        assert pub.wait_for_subscribers(1, timeout_s=0.2) == 0
        assert 0.15 < time.monotonic() - t0 < 2.0
        subs = [Collector(pub.endpoint, 1, timeout_s=3) for _ in range(2)]
        other = Collector(pub.endpoint, 1, topic=b"elsewhere", timeout_s=0.5)
        for s in [*subs, other]:
            s.start()
        assert pub.wait_for_subscribers(2, timeout_s=5) == 2
        pub.send(record(0))
        for s in subs:
            s.join(5)
            assert len(s.records) == 1
        other.join(5)
        assert other.records == []  # another topic gets nothing


def test_malformed_messages_and_other_versions_are_skipped_and_counted() -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub = Collector(f"tcp://127.0.0.1:{port}", 2, timeout_s=3)
        sub.start()
        assert pub.poll(5000), "no subscription arrived"
        assert pub.recv() == b"\x01" + DEFAULT_TOPIC
        v2 = dict(record(1), v=2)
        missing = record(2)
        del missing["radius"]
        for parts in (
            [DEFAULT_TOPIC, b"\xc1 not msgpack"],
            [DEFAULT_TOPIC, pack(v2)],
            [DEFAULT_TOPIC],
            [DEFAULT_TOPIC, msgpack.packb([1, 2, 3])],
            [DEFAULT_TOPIC, pack(missing)],
            [DEFAULT_TOPIC, pack(record(3)), b"extra part"],
            [DEFAULT_TOPIC, pack(record(4))],
            [DEFAULT_TOPIC, pack(record(5))],
        ):
            pub.send_multipart(parts)
        sub.join(10)
    finally:
        pub.close()
    assert [r["seq"] for r in sub.records] == [4, 5]
    assert sub.stats == {
        "received": 2,
        "malformed": 6,
        "unsupported_version": 1,
        "status": 0,
        "missed": 0,
        "restarts": 0,
        "connects": 1,
        "disconnects": 0,
        "handshake_failures": 0,
    }


def test_subscribe_stops_after_timeout_without_messages() -> None:
    stats: dict = {}
    t0 = time.monotonic()
    got = list(subscribe("tcp://127.0.0.1:1", "rrise", timeout_s=0.3, stats=stats))
    assert got == [] and stats["received"] == 0
    assert 0.25 < time.monotonic() - t0 < 3.0


def test_subscriber_reconnects_when_the_publisher_restarts(tmp_path: Path) -> None:
    # An ipc endpoint, not TCP: a restarted TCP publisher must rebind the same port, and a subscriber
    # reconnecting to a closed port can be handed that very port as its own (a TCP self-connect) or
    # meet a port the kernel still holds. The reconnect logic under test is the same on every transport.
    with ZmqPublisher(f"ipc://{tmp_path / 'restart.sock'}") as first:
        endpoint = first.endpoint
        sub = Collector(endpoint, 2, timeout_s=8)
        sub.start()
        assert first.wait_for_subscribers(1, 5) == 1
        first.send(record(0))
        deadline = time.monotonic() + 5
        while not sub.records and time.monotonic() < deadline:
            time.sleep(0.01)
    second = None
    deadline = time.monotonic() + 5
    while second is None:  # ZeroMQ closes the old listener asynchronously
        try:
            second = ZmqPublisher(endpoint)
        except SinkError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with second:
        assert second.wait_for_subscribers(1, 8) == 1
        second.send(record(1))
        sub.join(10)
    assert [r["seq"] for r in sub.records] == [0, 1]


def test_nodrop_publisher_counts_drops_instead_of_blocking(tmp_path: Path) -> None:
    with ZmqPublisher("tcp://127.0.0.1:*", hwm=1, nodrop=True) as pub:
        ctx = zmq.Context.instance()
        slow = ctx.socket(zmq.SUB)  # subscribes but never reads
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.setsockopt(zmq.RCVBUF, 4096)
        slow.setsockopt(zmq.SUBSCRIBE, DEFAULT_TOPIC)
        slow.connect(pub.endpoint)
        try:
            assert pub.wait_for_subscribers(1, 5) == 1
            t0 = time.monotonic()
            big = dict(record(0), source="x" * 20_000)
            for _ in range(2000):
                pub.send(big)
                if pub.drops:
                    break
            assert pub.drops > 0 and time.monotonic() - t0 < 10
        finally:
            slow.close()


def test_import_rrise_does_not_import_zmq() -> None:
    code = (
        "import sys, rrise; assert 'zmq' not in sys.modules; rrise.subscribe; assert 'zmq' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert rrise.subscribe is subscribe


_ABANDONED = """
import sys, threading, time
from rrise import Certificate, subscribe
from rrise.records import Record, Verdict
from rrise.runtime.sinks import ZmqPublisher

def record(seq):
    cert = Certificate(top_class=0, abstain=False, radius=0.1, score=0.9, p_lower=0.8)
    verdict = Verdict(seq, seq, cert, "a", None, None, None)
    return Record.of(verdict, stamp_ns=time.time_ns(), latency_ms=0.0, source="t", bundle="b" * 16).to_dict()

def listen(endpoint, got):
    for r in subscribe(endpoint, timeout_s=5):  # left by break: never closed, the collector ends it
        got.append(r)
        break

with ZmqPublisher("tcp://127.0.0.1:*") as first:
    got = []
    thread = threading.Thread(target=listen, args=(first.endpoint, got))
    thread.start()
    assert first.wait_for_subscribers(1, 5) == 1
    first.send(record(0))
    thread.join(5)
assert got
with ZmqPublisher("ipc://" + sys.argv[1]) as pub:
    stats = {}
    sub = subscribe(pub.endpoint, timeout_s=3, stats=stats)
    assert pub.wait_for_subscribers(1, 5) == 1
for _ in sub:  # the publisher is closed: the subscriber must see it go
    pass
print(stats["disconnects"])
"""


def test_an_abandoned_subscription_does_not_stop_later_sockets_from_closing(tmp_path: Path) -> None:
    """A Subscription left to the garbage collector used to close its socket before its monitor,
    which left the process's ZeroMQ reaper waiting: no socket closed after it (a publisher kept its
    port, its subscribers never saw it go). A fresh interpreter keeps this test's state its own."""
    out = subprocess.run(
        [sys.executable, "-c", _ABANDONED, str(tmp_path / "p.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 1, out.stdout


def test_records_keep_their_wire_format_key_for_key() -> None:
    """A record and a status record built from their Structs are the same msgpack maps, key order
    and types included, as the dicts every v1 runtime has published."""
    from rrise.records import Record, Status, Verdict, unpack_status

    cert = Certificate(top_class=2, abstain=False, radius=0.5, score=0.9, p_lower=0.8)
    verdict = Verdict(7, 9, cert, "c", None, "ood", 0.25)
    rec = Record.of(verdict, stamp_ns=123, latency_ms=1.5, source="cam", bundle="b" * 16).to_dict()
    v1 = {
        "v": 1, "seq": 7, "frame": 9, "stamp_ns": 123, "source": "cam", "pred": 2, "label": "c",
        "abstain": False, "radius": 0.5, "score": 0.9, "p_lower": 0.8, "latency_ms": 1.5,
        "bundle": "b" * 16, "error": None, "alarm": "ood", "ood_p": 0.25,
    }  # fmt: skip
    assert pack(rec) == msgpack.packb(v1) and list(msgpack.unpackb(pack(rec))) == list(v1)
    status = Status(
        stamp_ns=1, source="cam", bundle="b", uptime_s=2.0, frames=3, fps=1.5, drops=0, errors=0,
        abstain_rate=None, latency_p50_ms=1.0, latency_p99_ms=2.0, alarm=None, source_state="open",
        reconnects=0, publish_failed=0, ood_flags=0, ood_flag_rate=None, monitor=None,
    ).to_dict()  # fmt: skip
    keys = list(msgpack.unpackb(pack(status)))
    assert keys[:17] == [
        "v", "kind", "stamp_ns", "source", "bundle", "uptime_s", "frames", "fps", "drops", "errors",
        "abstain_rate", "latency_p50_ms", "latency_p99_ms", "alarm", "source_state", "reconnects",
        "publish_failed",
    ]  # fmt: skip
    old_status = {k: status[k] for k in keys[:17]}  # a status record of an earlier v1 runtime
    assert unpack_status(msgpack.packb(old_status))["frames"] == 3
