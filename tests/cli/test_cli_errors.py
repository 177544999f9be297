"""Messages instead of tracebacks (issue 13, Found 6): every attack gets one line naming the key,
file or option, exit status 1 (130 for a signal), and nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.cli import app
from rrise.runtime import Runtime
from tests.runtime_fixtures import make_bundle, sample_frames

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("cli-errors") / "bundle")


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2

    folder = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(sample_frames(4)):
        cv2.imwrite(str(folder / f"{i}.png"), f)
    return folder


def message(result) -> str:
    """The one line a user sees; a traceback would fail here."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.output.strip()


@pytest.mark.parametrize("stage", ["calibrate", "evaluate"])
def test_a_stage_on_an_empty_work_folder_says_what_to_run_first(tmp_path: Path, stage: str) -> None:
    result = runner.invoke(
        app, [stage, "--workdir", str(tmp_path / "w"), "--dataset", "digits", "--no-progress"]
    )
    assert result.exit_code == 1
    assert f"error: {stage} needs the outputs of train-base" in message(result)


def test_a_damaged_run_json_is_named_not_a_json_traceback(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("")
    result = runner.invoke(app, ["calibrate", "--workdir", str(tmp_path), "--dataset", "digits"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'run.json'} cannot be read" in message(result)


def test_a_bad_sigma_writes_nothing(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    result = runner.invoke(
        app, ["train-base", "--workdir", str(fresh), "--dataset", "digits", "--sigma", "-0.5"]
    )
    assert result.exit_code == 1
    assert "sigma must be > 0" in message(result)
    assert not fresh.exists()
    # A folder made before keeps its run.json, and keeps working.
    ok = runner.invoke(app, ["calibrate", "--workdir", str(tmp_path / "w"), "--dataset", "digits"])
    before = (tmp_path / "w" / "run.json").read_text()
    assert "needs the outputs of train-base" in message(ok)
    runner.invoke(app, ["train-base", "--workdir", str(tmp_path / "w"), "--sigma", "nan"])
    assert (tmp_path / "w" / "run.json").read_text() == before


@pytest.mark.parametrize("name, value", [("alpha", "0"), ("beta", "1.5"), ("delta", "-1")])
def test_calibrate_names_the_option_that_is_out_of_range(tmp_path: Path, name: str, value: str) -> None:
    result = runner.invoke(app, ["calibrate", "--workdir", str(tmp_path), f"--{name}", value])
    assert result.exit_code == 2  # a bad option value is a usage error, as for any flag
    assert message(result) == f"error: --{name} must be in (0, 1), got {float(value):g}"
    assert not (tmp_path / "run.json").exists()


def test_jsonl_to_a_folder_or_an_unwritable_path_is_a_message(bundle_dir, frames_dir, tmp_path) -> None:
    base = ["run", "--bundle", str(bundle_dir), "--source", str(frames_dir), "--jsonl"]
    result = runner.invoke(app, [*base, str(tmp_path)])
    assert result.exit_code == 1
    assert f"cannot write records to {tmp_path}: it is a folder" in message(result)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "sub" / "records.jsonl"
        result = runner.invoke(app, [*base, str(target)])
        if os.geteuid() != 0:  # root writes anywhere
            assert result.exit_code == 1
            assert f"cannot write records to {target}: Permission denied" in message(result)
    finally:
        locked.chmod(0o700)
    result = runner.invoke(app, [*base, "/proc/no/such/records.jsonl"])
    assert result.exit_code == 1
    assert "cannot write records to /proc/no/such/records.jsonl" in message(result)


@pytest.mark.parametrize(
    "endpoint, says",
    [
        ("garbage", "'garbage' is not a ZeroMQ endpoint to connect to"),
        ("tcp://*:5555", "tcp://*:5555 is an address a publisher binds"),
        ("tcp://localhost", "needs a host and a port number"),
    ],
)
def test_subscribe_to_a_bad_endpoint_is_a_message(endpoint: str, says: str) -> None:
    result = runner.invoke(app, ["subscribe", endpoint, "--timeout", "0.1"])
    assert result.exit_code == 1
    assert says in message(result)


def test_certify_batch_names_the_bad_argument(bundle_dir: Path) -> None:
    rt = Runtime(bundle_dir)
    frames = sample_frames(2)
    with pytest.raises(TypeError, match="^frames must be a list or a sequence, got NoneType"):
        rt.certify_batch(None)
    with pytest.raises(TypeError, match="^stamp_ns must be an int, the capture time in Unix ns, got 'x'"):
        rt.certify_batch(frames, stamp_ns="x")
    with pytest.raises(TypeError, match=r"give nanoseconds as an int"):
        rt.certify_batch(frames, stamp_ns=1.7e9)
    with pytest.raises(TypeError, match=r"^stamp_ns\[\] must be an int"):
        rt.certify_batch(frames, stamp_ns=[1, "2"])
    with pytest.raises(ValueError, match="^3 stamp_ns values for 2 frames"):
        rt.certify_batch(frames, stamp_ns=[1, 2, 3])
    with pytest.raises(ValueError, match=r"^frame_indices\[\] must be >= 0"):
        rt.certify_batch(frames, frame_indices=[0, -1])
    with pytest.raises(TypeError, match="^stamp_ns must be an int"):
        rt.certify(frames[0], stamp_ns="x")
    good = rt.certify_batch(np.stack(frames), stamp_ns=np.int64(5), frame_indices=(3, 4))
    assert [r["frame"] for r in good] == [3, 4] and {r["stamp_ns"] for r in good} == {5}


SIGNAL_EARLY = """
import os, signal, sys, threading
import rrise.cli
delay, sig = float(sys.argv[1]), getattr(signal, sys.argv[2])
timer = threading.Timer(delay, lambda: os.kill(os.getpid(), sig))
timer.daemon = True  # a command done before the delay: no signal, not one during interpreter exit
timer.start()
try:
    rrise.cli.main(sys.argv[3:])  # the signal comes while the command starts (or soon after)
finally:
    timer.cancel()
"""


@pytest.mark.parametrize("delay", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_rrise_run_starts_is_a_message(bundle_dir, frames_dir, tmp_path, delay, sig) -> None:
    out = tmp_path / "records.jsonl"
    args = ["run", "--bundle", str(bundle_dir), "--source", str(frames_dir), "--jsonl", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_EARLY, str(delay), sig, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr
    if proc.returncode == 0:  # the signal came once the stream was running: a clean, flushed stop
        summary = json.loads(proc.stderr.strip().splitlines()[-1])["summary"]
        assert len(out.read_text().splitlines()) == summary["frames"]
    elif proc.returncode == -signal.SIGTERM:  # before the CLI took SIGTERM over: killed, silently
        assert sig == "SIGTERM" and proc.stderr == ""
    else:
        assert proc.returncode == 130, proc.stderr  # while parsing options, typer exits 130 quietly
        assert proc.stderr == "" or proc.stderr.strip().splitlines()[-1].startswith("error: interrupted")


def test_a_ctrl_c_swallowed_by_native_code_comes_again() -> None:
    """A compiled library can only print an interrupt raised in a callback it runs ("Exception
    ignored … Traceback"); the CLI's hook sends the signal again instead, so Ctrl-C still ends it."""
    import signal
    import types

    from rrise.cli import _interrupt_not_lost

    passed_on = []
    hook = _interrupt_not_lost(passed_on.append)
    other = types.SimpleNamespace(exc_value=ValueError("x"))
    hook(other)
    assert passed_on == [other]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            hook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert passed_on == [other]
