"""Streams that say what happened (issue 13, Found 4 and 7): subscribers counted, runs that reach no
one warned about, records with wrong types skipped and counted, a message size cap, and ``missed``
kept sane across publisher restarts."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from typer.testing import CliRunner

from rrise.cli import app
from rrise.records import DEFAULT_TOPIC, STATUS_TOPIC, RecordError, pack, unpack
from rrise.runtime import run_stream
from rrise.runtime.runner import SUMMARY_KEYS
from rrise.runtime.sources import PushSource
from rrise.subscriber import subscribe
from tests.runtime_fixtures import make_bundle, record_of, run_options, sample_frames

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "subscriber.py"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("streams") / "bundle")


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def frames_source(n: int, pace_s: float = 0.0) -> PushSource:
    """A source of ``n`` frames, pushed from a thread (``pace_s`` apart), ending after the last."""
    src = PushSource("frames", live=False, capacity=n + 1)

    def push() -> None:
        for f in sample_frames(n):
            src.push(f)
            time.sleep(pace_s)
        src.end()

    threading.Thread(target=push, daemon=True).start()
    return src


def good(n: int, **changes) -> dict:
    """A valid record number ``n`` (seq and frame), with ``changes`` applied over it."""
    from rrise.certificate import Certificate

    cert = Certificate(top_class=1, abstain=False, radius=0.2, score=0.9, p_lower=0.8)
    rec = record_of(n, cert)
    return {**rec, **changes}


class RawPublisher:
    """A bare XPUB socket, to send what a real runtime never would."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    def wait_subscription(self, timeout_s: float = 5.0) -> None:
        """Until a subscription arrives (unsubscriptions on the way are passed over)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(100) and self.sock.recv()[:1] == b"\x01":
                return
        raise AssertionError("no subscription arrived")

    def send(self, *payloads: bytes) -> None:
        for p in payloads:
            self.sock.send_multipart([DEFAULT_TOPIC, p])

    def close(self) -> None:
        self.sock.close()


def collect(endpoint: str, n: int, timeout_s: float = 3.0, **options) -> tuple[list, dict, threading.Thread]:
    """Subscribe in a thread until ``n`` records came or the link went quiet for ``timeout_s``;
    returns (records, stats, thread) with the socket connected."""
    got: list[dict] = []
    stats: dict = {}
    ready = threading.Event()

    def run() -> None:
        with subscribe(endpoint, timeout_s=timeout_s, stats=stats, **options) as sub:
            ready.set()
            for rec in sub:
                got.append(rec)
                if len(got) >= n:
                    break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    return got, stats, thread


# --- Found 4: a run that reaches no one says so -----------------------------------------------


def test_a_publish_run_with_no_subscriber_says_none_of_its_records_reached_one(bundle_dir, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="rrise")
    summary = run_stream(
        bundle_dir, frames_source(12), run_options(publish=free_endpoint(), status_interval=0)
    )
    assert summary["frames"] == 12 and set(summary) == set(SUMMARY_KEYS)
    assert summary["published"] == 12 and summary["published_unheard"] == 12
    assert summary["subscribers_peak"] == 0 and summary["published_offered"] == 0
    assert len(summary["warnings"]) == 1
    assert summary["warnings"][0].startswith("0 of 12 record(s) reached a subscriber")
    assert "--wait-subscribers" in summary["warnings"][0]
    assert any("0 of 12 record(s) reached a subscriber" in r.getMessage() for r in caplog.records)


def test_a_waited_for_subscriber_gets_every_record_and_is_counted(bundle_dir) -> None:
    endpoint = free_endpoint()
    got: list[dict] = []
    statuses: list[dict] = []

    def listen() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the publisher is not bound yet: ZeroMQ keeps retrying
            with subscribe(endpoint, timeout_s=10) as sub:
                for rec in sub:
                    got.append(rec)
                    if len(got) == 15:
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    summary = run_stream(
        bundle_dir,
        frames_source(15, pace_s=0.01),
        run_options(publish=endpoint, wait_subscribers=1, wait_timeout=10, status_interval=0.02),
        on_status=statuses.append,
    )
    t.join(10)
    assert [r["seq"] for r in got] == list(range(15))
    assert summary["subscribers_peak"] == 1 and summary["published"] == 15
    assert summary["published_unheard"] == 0 and summary["published_offered"] == 15
    assert summary["warnings"] == []
    pub = summary["publishers"][0]
    assert pub["endpoint"] == endpoint and pub["subscriptions_seen"] == 1
    first = statuses[0]  # (the subscriber may have left by the last one)
    assert first["subscribers"] == 1 and first["subscribers_peak"] == 1
    assert [s["published"] for s in statuses] == sorted(s["published"] for s in statuses)


def test_a_run_without_any_output_warns_at_the_start_and_in_the_summary(bundle_dir, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="rrise")
    summary = run_stream(bundle_dir, frames_source(5), run_options(status_interval=0))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("no output: every record will be certified and discarded")
    assert summary["warnings"] == [
        "no output: 5 record(s) were certified and discarded (give --publish ENDPOINT or --jsonl PATH, "
        "or --no-output if that is what you mean)"
    ]
    assert summary["subscribers"] is None and summary["publishers"] == []
    caplog.clear()
    quiet = run_stream(bundle_dir, frames_source(5), run_options(status_interval=0, no_output=True))
    assert quiet["warnings"] == [] and not caplog.records
    with pytest.raises(ValueError, match="--no-output contradicts"):
        run_options(jsonl="-", no_output=True)
    with pytest.raises(ValueError, match="--no-output contradicts the callback"):
        run_stream(bundle_dir, frames_source(1), run_options(no_output=True), callback=print)


def test_rrise_subscribe_says_it_received_nothing_and_exits_1_on_timeout() -> None:
    endpoint = free_endpoint()
    result = CliRunner().invoke(app, ["subscribe", endpoint, "--timeout", "0.3"])
    assert result.exit_code == 1
    assert f"received 0 records from {endpoint}" in result.output
    assert "never connected" in result.output


def test_help_documents_wait_subscribers_next_to_publish() -> None:
    import typer

    run = typer.main.get_command(app).commands["run"]
    helps = {p.opts[0]: p.help for p in run.params if p.opts}
    lost = "Records published before a subscriber connects are lost: see --wait-subscribers"
    assert lost in helps["--publish"]
    assert "before the first frame" in helps["--wait-subscribers"]
    readme = (ROOT / "README.md").read_text()
    assert "--wait-subscribers" in readme


# --- Found 7: consumers need not trust types --------------------------------------------------

BAD_TYPES = [
    {"radius": "lots"},
    {"radius": float("nan")},
    {"radius": float("inf")},
    {"radius": -0.1},
    {"seq": -1},
    {"seq": 1.5},
    {"abstain": 1},
    {"pred": True},
    {"score": 1.5},
    {"label": 7},
    {"stamp_ns": "yesterday"},
    {"abstain": True},  # abstaining with a radius and a pred
    {"error": "camera glitch"},  # a prediction with an error
]


@pytest.mark.parametrize("change", BAD_TYPES, ids=[next(iter(c)) for c in BAD_TYPES])
def test_unpack_refuses_a_record_with_a_wrong_type_or_value(change) -> None:
    with pytest.raises(RecordError, match="bad value"):
        unpack(pack(good(0, **change)))


def test_unpack_keeps_extra_keys_and_accepts_numpy_scalars() -> None:
    import numpy as np

    rec = good(3, radius=np.float64(0.25), newer_key=[1, 2])
    out = unpack(pack(rec))
    assert out["radius"] == 0.25 and out["newer_key"] == [1, 2]


def test_records_with_wrong_types_are_skipped_and_counted_by_the_subscriber() -> None:
    pub = RawPublisher()
    try:
        got, stats, thread = collect(pub.endpoint, 2)
        pub.wait_subscription()
        pub.send(*(pack(good(i, **c)) for i, c in enumerate(BAD_TYPES)))
        pub.send(msgpack.packb({**good(50), "radius": "lots"}), pack(good(51)), pack(good(52)))
        thread.join(10)
    finally:
        pub.close()
    assert [r["seq"] for r in got] == [51, 52]
    assert stats["malformed"] == len(BAD_TYPES) + 1 and stats["received"] == 2


def test_the_example_subscriber_survives_bad_records(tmp_path: Path) -> None:
    pub = RawPublisher()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "subscriber.py"),
            pub.endpoint,
            "--timeout",
            "1.5",
            "--status",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pub.wait_subscription(20)
        time.sleep(0.1)
        pub.send(pack(good(0, radius="lots")), pack(good(1, latency_ms=None)), pack(good(2)))
        pub.sock.send_multipart([STATUS_TOPIC, pack({"v": 1, "kind": "status", "fps": "fast"})])
        out, err = proc.communicate(timeout=20)
    finally:
        pub.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "#2 frame 2" in out and "certified within radius 0.200" in out
    assert "received 1, missed 0, malformed 3" in out


def test_a_message_over_the_size_cap_is_refused_and_the_stream_goes_on() -> None:
    pub = RawPublisher()
    try:
        got, stats, thread = collect(pub.endpoint, 1, timeout_s=5, max_message_bytes=4096)
        pub.wait_subscription()
        pub.send(b"\x00" * 1_000_000)  # refused unread: ZeroMQ closes that connection
        pub.wait_subscription()  # the subscriber connected again by itself
        pub.send(pack(good(7)))
        thread.join(10)
    finally:
        pub.close()
    assert [r["seq"] for r in got] == [7]
    assert stats["disconnects"] >= 1 and stats["connects"] >= 2


SUBSCRIBER_RSS = textwrap.dedent(
    """
    import resource, sys, time
    from rrise.subscriber import subscribe
    stats = {}
    sub = subscribe(sys.argv[1], timeout_s=1.5, stats=stats)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("ready", flush=True)
    time.sleep(1.5)  # not reading: whatever ZeroMQ accepts piles up in this process
    seqs = [r["seq"] for r in sub]
    growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(growth_kb, seqs, stats["disconnects"], flush=True)
    """
)


def test_big_messages_cannot_blow_up_the_subscribers_memory() -> None:
    pub = RawPublisher()
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER_RSS, pub.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        pub.wait_subscription(20)
        big = b"\x00" * (4 << 20)
        for _ in range(30):  # 120 MB, as fast as the link takes it
            pub.sock.send_multipart([DEFAULT_TOPIC, big])
        pub.wait_subscription(20)  # it refused the first, and connected again
        pub.send(pack(good(1)))
        out = proc.communicate(timeout=20)[0].split(" ", 1)
    finally:
        pub.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    growth_kb, rest = int(out[0]), out[1]
    assert growth_kb < 30_000, f"the subscriber grew by {growth_kb // 1024} MB"
    assert rest.startswith("[1] ")  # the record after them still came


# --- missed across restarts -------------------------------------------------------------------


def test_missed_stays_sane_when_seq_goes_back_or_jumps_absurdly() -> None:
    pub = RawPublisher()
    seqs = [0, 1, 2, 2**62, 0, 1, 5, 3]
    try:
        got, stats, thread = collect(pub.endpoint, len(seqs))
        pub.wait_subscription()
        pub.send(*(pack(good(s)) for s in seqs))
        thread.join(10)
    finally:
        pub.close()
    assert [r["seq"] for r in got] == seqs
    # 2**62 (an absurd jump), 0 (back: a restart) and 3 (back) start new streams; 1 → 5 lost 3.
    assert stats["missed"] == 3 and stats["restarts"] == 3


def test_the_cli_prints_records_as_json_and_reports_what_it_skipped() -> None:
    pub = RawPublisher()
    out: dict = {}

    def run_cli() -> None:
        out["result"] = CliRunner().invoke(app, ["subscribe", pub.endpoint, "--count", "2", "--timeout", "5"])

    t = threading.Thread(target=run_cli)
    t.start()
    try:
        pub.wait_subscription(10)
        pub.send(pack(good(0, radius="lots")), pack(good(1)), pack(good(9)))
        t.join(15)
    finally:
        pub.close()
    result = out["result"]
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seq"] for r in lines] == [1, 9]
    assert f"received 2 records from {pub.endpoint}; 1 malformed message(s) skipped; 7 record(s) missed" in (
        result.output
    )
