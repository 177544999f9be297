"""Shard assignment, launcher environment, and `torchrun --nproc-per-node 2 -m rrise targets` (gloo, CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rrise.calibrate import distributed as dist
from rrise.calibrate.store import CountStore
from rrise.cli import app
from tests.calibrate.test_store import _copy_workdir, _tree, digits_workdir  # noqa: F401 - a shared fixture


@pytest.mark.parametrize(("num_shards", "world"), [(0, 2), (1, 3), (7, 2), (16, 4), (5, 8)])
def test_shards_are_split_disjointly_and_completely(num_shards, world):
    parts = [dist.assign_shards(num_shards, r, world) for r in range(world)]
    flat = sorted(s for p in parts for s in p)
    assert flat == list(range(num_shards))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_bad_ranks_are_refused():
    with pytest.raises(ValueError, match="rank"):
        dist.assign_shards(4, 2, 2)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist.dist_info({"RANK": "3", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='x'"):
        dist.dist_info({"RANK": "x", "WORLD_SIZE": "2"})


def test_launcher_environment_and_process_group_backend():
    assert dist.dist_info({}) == dist.DistInfo(0, 1, 0)
    info = dist.dist_info({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.distributed, info.is_main) == (
        5,
        8,
        1,
        True,
        False,
    )
    assert dist.pick_backend(cuda_available=True) == "nccl"
    assert dist.pick_backend(cuda_available=False) == "gloo"


def test_single_process_helpers_need_no_process_group():
    info = dist.DistInfo()
    assert dist.run_on_rank0_first(info, lambda: 42) == 42
    assert dist.broadcast(info, "x") == "x"
    dist.barrier()


def test_torchrun_two_processes_give_the_single_process_store(digits_workdir, tmp_path):  # noqa: F811
    single = _copy_workdir(digits_workdir, tmp_path / "single")
    result = CliRunner().invoke(app, ["targets", "--workdir", str(single), "--no-progress"])
    assert result.exit_code == 0, result.output

    multi = _copy_workdir(digits_workdir, tmp_path / "multi")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "rrise", "targets", "--workdir", str(multi), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got, want = _tree(multi / "targets"), _tree(single / "targets")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    store = CountStore.load(multi / "targets" / "train")
    assert store.complete and store.num_shards > 2  # both ranks had shards to sample
    shutil.rmtree(multi)
