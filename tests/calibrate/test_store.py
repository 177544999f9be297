"""The sharded count store: atomic shards, metadata checks on resume, and kill -9 → resume → same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.calibrate import store as st
from rrise.cli import app

KW = dict(n=8, sigma=0.25, seed=3, num_classes=3, shard_size=4, base_sha256="ab", dataset="d", split="train")


def _open(path, index=np.arange(10), **over):
    return st.CountStore.open(path, index, **{**KW, "backend": "onnxruntime", **over})


def _counts(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(8, [0.2, 0.3, 0.5], size=rows).astype(np.int64)


def test_shards_roundtrip_and_completion(tmp_path):
    s = _open(tmp_path / "s")
    assert s.num_shards == 3 and s.bounds(2) == (8, 10) and s.missing() == [0, 1, 2]
    full = _counts(10)
    for k in (2, 0):
        lo, hi = s.bounds(k)
        s.write_shard(k, full[lo:hi])
    with pytest.raises(ValueError, match="incomplete"):
        s.counts()
    with pytest.raises(ValueError, match="incomplete"):
        s.finalize()
    s.write_shard(1, full[4:8])
    s.finalize()
    index, counts, meta = st.load_store(tmp_path / "s")
    np.testing.assert_array_equal(index, np.arange(10))
    np.testing.assert_array_equal(counts, full)
    assert counts.dtype == np.int64 and meta["n"] == 8
    np.testing.assert_array_equal(st.load_counts(tmp_path / "s"), full)
    assert not list((tmp_path / "s").glob(".*"))  # no temporary file left behind


def test_bad_shards_are_refused(tmp_path):
    s = _open(tmp_path / "s")
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        s.write_shard(0, _counts(3))
    bad = _counts(4)
    bad[2, 0] += 1
    with pytest.raises(ValueError, match="position 2"):
        s.write_shard(0, bad)
    with pytest.raises(IndexError):
        s.bounds(3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("sigma", 0.5), ("n", 16), ("seed", 4), ("base_sha256", "cd"), ("dataset", "e"), ("split", "test")],
)
def test_resume_refuses_a_metadata_mismatch_naming_the_field(tmp_path, field, value):
    s = _open(tmp_path / "s")
    s.write_shard(0, _counts(4))
    with pytest.raises(st.StoreMismatchError, match=f"{field}=") as info:
        _open(tmp_path / "s", **{field: value})
    assert info.value.field == field
    assert s.has(0)  # nothing was touched
    fresh = _open(tmp_path / "s", resume=False, **{field: value})  # --no-resume starts over
    assert fresh.missing() == [0, 1, 2] and fresh.meta[field] == value


def test_resume_refuses_another_index_and_foreign_folders(tmp_path):
    _open(tmp_path / "s")
    with pytest.raises(st.StoreMismatchError, match="num_inputs"):
        _open(tmp_path / "s", index=np.arange(11))
    with pytest.raises(st.StoreMismatchError, match="index_sha256"):
        _open(tmp_path / "s", index=np.arange(1, 11))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a count store"):
        _open(tmp_path / "other")
    with pytest.raises(ValueError, match="not a count store"):
        st.discard(tmp_path / "other")
    assert (tmp_path / "other" / "x.txt").exists()


def test_stale_temporary_files_are_cleaned_on_open(tmp_path):
    s = _open(tmp_path / "s")
    (s.path / ".shard-00001.npy.tmp-999").write_bytes(b"half a shard")
    again = _open(tmp_path / "s")
    assert again.missing() == [0, 1, 2] and not list(s.path.glob(".*"))


def test_a_second_writer_opening_the_store_leaves_the_first_ones_temporary_files(tmp_path):
    s = _open(tmp_path / "s")
    writing = s.path / ".tmp.shard-00000.npy.abc123"  # rank 0, half-way through its first shard
    writing.write_bytes(b"half a shard")
    _open(tmp_path / "s", clean=False)  # another rank joins
    assert writing.exists()
    _open(tmp_path / "s")  # a later run: now it is a leftover
    assert not writing.exists()


def test_fill_store_is_independent_of_sharding(tmp_path):
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    images = np.random.default_rng(0).random((10, 1, 2, 2), dtype=np.float32)
    a = _open(tmp_path / "a", backend="torch:cpu", shard_size=3)
    b = _open(tmp_path / "b", backend="torch:cpu", shard_size=10)
    st.fill_store(a, images, model, batch_size=5, show_progress=False)
    st.fill_store(b, images, model, batch_size=64, show_progress=False)
    np.testing.assert_array_equal(a.counts(), b.counts())
    with pytest.raises(ValueError, match="holds 10 inputs"):
        st.fill_store(a, images[:5], model, show_progress=False)


# --- rrise targets: kill -9 in the middle, then resume ----------------------------------------


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory) -> Path:
    """A digits work folder with a small (untrained) base model: all `rrise targets` needs."""
    from rrise.calibrate.model_files import save_model
    from rrise.calibrate.models import build_model
    from rrise.calibrate.pipeline import RunConfig, Workdir
    from rrise.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("targets") / "work"
    w = Workdir.open(root, RunConfig(dataset="digits"), show_progress=False)
    ds = w.data("train")
    model = build_model("cnn-small", 1, 10, 8, mean=0.3, std=0.4)
    spec = dict(in_channels=1, num_classes=10, image_size=8, mean=[0.3], std=[0.4])
    save_model(model, root / "base.pt", arch="cnn-small", **spec, labels=ds.classes, dataset="digits")
    export_onnx(model, root / "base.onnx", (1, 8, 8))
    return root


def _copy_workdir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("run.json", "base.pt", "base.onnx"):
        shutil.copy(src / name, dst / name)
    return dst


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SLOW_TARGETS = """
import sys, time
from rrise.calibrate import store
_write = store.CountStore.write_shard
def slow_write(self, shard, counts):  # lets the test kill the run between two shards
    path = _write(self, shard, counts)
    time.sleep(0.4)
    return path
store.CountStore.write_shard = slow_write
from rrise.cli import main
main(["targets", "--workdir", sys.argv[1], "--no-progress"])
"""


def test_kill_9_then_resume_gives_a_byte_identical_store(digits_workdir, tmp_path):
    ref = _copy_workdir(digits_workdir, tmp_path / "ref")
    result = CliRunner().invoke(app, ["targets", "--workdir", str(ref), "--no-progress"])
    assert result.exit_code == 0, result.output

    work = _copy_workdir(digits_workdir, tmp_path / "killed")
    script = tmp_path / "slow_targets.py"
    script.write_text(textwrap.dedent(SLOW_TARGETS))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(work)], env=env, stderr=subprocess.PIPE)
    train = work / "targets" / "train"
    deadline = time.monotonic() + 45
    try:
        while not list(train.glob("shard-*.npy")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (train / "manifest.json").exists()
    partial = st.CountStore.load(train)
    assert 0 < partial.num_shards - len(partial.missing()) < partial.num_shards

    resumed = CliRunner().invoke(app, ["targets", "--workdir", str(work), "--resume", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    got, want = _tree(work / "targets"), _tree(ref / "targets")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    counts = st.load_counts(train)
    assert counts.shape == (400, 10) and (counts.sum(1) == 32).all()


def test_targets_refuses_to_resume_after_the_base_model_changed(digits_workdir, tmp_path):
    work = _copy_workdir(digits_workdir, tmp_path / "w")
    runner = CliRunner()
    assert runner.invoke(app, ["targets", "--workdir", str(work), "--no-progress"]).exit_code == 0
    (work / "targets" / "train" / "manifest.json").unlink()  # as if interrupted before the end
    (work / "targets" / "train" / "shard-00003.npy").unlink()
    (work / "targets" / "selection" / "manifest.json").unlink()
    from rrise.calibrate.models import build_model
    from rrise.export.onnx_export import export_onnx

    export_onnx(build_model("cnn-small", 1, 10, 8), work / "base.onnx", (1, 8, 8))  # another base model
    result = runner.invoke(app, ["targets", "--workdir", str(work), "--no-progress"])
    assert result.exit_code == 1
    assert "base_sha256" in result.output and "refusing to resume" in result.output
    meta = json.loads((work / "targets" / "train" / "meta.json").read_text())
    assert (work / "targets" / "train" / "shard-00000.npy").exists()  # refused, nothing discarded
    result = runner.invoke(app, ["targets", "--workdir", str(work), "--no-resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (
        json.loads((work / "targets" / "train" / "meta.json").read_text())["base_sha256"]
        != meta["base_sha256"]
    )
