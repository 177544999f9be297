"""ZeroMQ CURVE (issue 13, Found 8): key files, an encrypted publisher, and subscribers with the
right key, the wrong key and no key."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest
import zmq

from rrise.certificate import Certificate
from rrise.curve import CurveKeyError, load_curve_public, load_curve_secret, write_curve_keypair
from rrise.records import Record, Verdict
from rrise.runtime.sinks import SinkError, ZmqPublisher
from rrise.subscriber import subscribe

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def record(seq: int) -> dict:
    cert = Certificate(top_class=2, abstain=False, radius=0.3, score=0.95, p_lower=0.9)
    verdict = Verdict(seq, seq, cert, None, None, None, None)
    return Record.of(verdict, stamp_ns=time.time_ns(), latency_ms=0.0, source="cam", bundle="b").to_dict()


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_curve_keypair(tmp_path / "robot")


def test_a_key_pair_is_written_in_zeromqs_certificate_format(keys, tmp_path: Path) -> None:
    pub, key = keys
    assert (pub.name, key.name) == ("robot.curve.pub", "robot.curve.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "secret-key" not in pub.read_text()
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(key))  # ZeroMQ's own reader agrees
    assert load_curve_secret(key) == (public, secret)
    assert load_curve_public(pub) == public == zmq.curve_public(secret)
    assert zmq.auth.load_certificate(str(pub)) == (public, None)


def test_keys_are_never_overwritten_and_bad_files_are_named(keys, tmp_path: Path) -> None:
    pub, key = keys
    before = key.read_bytes()
    with pytest.raises(CurveKeyError, match="robot.curve.pub exists"):
        write_curve_keypair(tmp_path / "robot")
    assert key.read_bytes() == before
    with pytest.raises(CurveKeyError, match="folder .* does not exist"):
        write_curve_keypair(tmp_path / "missing" / "robot")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(CurveKeyError, match="holds no CURVE secret-key"):
        load_curve_secret(pub)
    broken = tmp_path / "broken.key"
    broken.write_text('curve\n    secret-key = "too short"\n')
    with pytest.raises(CurveKeyError, match="secret-key is not a 40-character z85 CURVE key"):
        load_curve_secret(broken)
    with pytest.raises(CurveKeyError, match="cannot read CURVE key file"):
        load_curve_public(tmp_path / "nowhere.pub")
    with pytest.raises(SinkError, match="--curve-secret: .*robot.curve.pub holds no CURVE secret-key"):
        ZmqPublisher("tcp://127.0.0.1:*", curve_secret=pub)


def listen(endpoint: str, got: list, stats: dict, **options) -> threading.Thread:
    ready = threading.Event()

    def run() -> None:
        with subscribe(endpoint, timeout_s=2.0, stats=stats, **options) as sub:
            ready.set()
            for rec in sub:
                got.append(rec["seq"])
                if len(got) == 5:
                    return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    return t


def test_only_a_subscriber_with_the_publishers_key_gets_the_records(keys, tmp_path: Path) -> None:
    pub_file, key_file = keys
    other_pub, _ = write_curve_keypair(tmp_path / "other")
    with ZmqPublisher("tcp://127.0.0.1:*", curve_secret=key_file) as pub:
        results = {name: ([], {}) for name in ("right", "wrong", "none")}
        threads = [
            listen(pub.endpoint, *results["right"], curve_server_key=pub_file),
            listen(pub.endpoint, *results["wrong"], curve_server_key=other_pub),
            listen(pub.endpoint, *results["none"]),
        ]
        assert pub.wait_for_subscribers(1, 5) == 1
        time.sleep(0.3)  # the other two had time to try, and fail, their handshakes
        assert pub.subscribers == 1
        for seq in range(5):
            assert pub.send(record(seq))
        for t in threads:
            t.join(10)
    assert results["right"][0] == [0, 1, 2, 3, 4]
    for name in ("wrong", "none"):
        got, stats = results[name]
        assert got == [] and stats["received"] == 0
        assert stats["handshake_failures"] >= 1, (name, stats)


def test_publishing_on_every_interface_without_curve_is_warned_about(keys, caplog) -> None:
    caplog.set_level("WARNING", logger="rrise")
    with ZmqPublisher("tcp://*:*"):
        pass
    assert any("without encryption or authentication" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with ZmqPublisher("tcp://*:*", curve_secret=keys[1]) as pub:
        assert pub.curve
    assert not caplog.records
