"""Multi-process Monte Carlo through torch's own launcher (``torchrun``), one GPU (or CPU) per rank.

``torchrun --nproc-per-node K -m rrise targets --workdir DIR`` starts K copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous) in the environment. Each rank samples the
shards ``s`` with ``s % WORLD_SIZE == RANK`` of a :class:`~rrise.calibrate.store.CountStore`; input
``i``'s noise depends only on ``(seed, i)``, so the merged store is byte-identical to a
single-process run. Rank 0 creates and checks the store, then every rank opens the same one; at the
end rank 0 collects any shard it cannot see on its own disk (multi-node without a shared file system)
and finalizes the store. Process groups use NCCL when every rank has a GPU, else gloo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "DistInfo",
    "assign_shards",
    "barrier",
    "broadcast",
    "dist_info",
    "init",
    "merge",
    "pick_backend",
    "run_on_rank0_first",
    "shutdown",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def dist_info(env: dict[str, str] | None = None) -> DistInfo:
    """Rank, world size and local rank from the environment torchrun sets (1 process without it)."""
    env = dict(os.environ) if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def assign_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards of ``rank``: every ``world_size``-th one, starting at ``rank`` (disjoint, covering all)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, max(num_shards, 0), world_size))


def pick_backend(cuda_available: bool) -> str:
    """``nccl`` when the ranks run on GPUs, else ``gloo`` (CPU)."""
    return "nccl" if cuda_available else "gloo"


def init(info: DistInfo | None = None) -> tuple[DistInfo, str]:
    """Join the process group (a no-op for one process); returns the info and the torch device to use.

    With CUDA, rank ``r`` uses ``cuda:LOCAL_RANK`` and NCCL; without, the CPU and gloo.
    """
    import torch
    import torch.distributed as dist

    info = dist_info() if info is None else info
    cuda = torch.cuda.is_available()
    device = f"cuda:{info.local_rank % max(torch.cuda.device_count(), 1)}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend=pick_backend(cuda))
    return info, device


def shutdown() -> None:
    """Leave the process group, if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def run_on_rank0_first(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on every other rank; an error on rank 0 is raised on every rank.

    For opening a store: rank 0 creates or checks it (and may refuse a mismatch) before the others
    look at it, and no rank is left waiting at a barrier when rank 0 fails.
    """
    dist = _dist()
    if dist is None or not info.distributed:
        return fn()
    error: list[Any] = [None]
    result, failure = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure, error = exc, [(type(exc).__name__, str(exc))]
    dist.broadcast_object_list(error, src=0)
    if failure is not None:
        raise failure
    if error[0] is not None:
        raise RuntimeError(f"rank 0 failed: {error[0][0]}: {error[0][1]}")
    if not info.is_main:
        result = fn()
    return result


def broadcast(info: DistInfo, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    dist = _dist()
    if dist is None or not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge(info: DistInfo, store) -> None:
    """After every rank wrote its shards: rank 0 gathers those it cannot see, then finalizes the store.

    On a shared file system nothing travels; on separate disks each missing shard is sent once by the
    rank that made it.
    """
    dist = _dist()
    if dist is None or not info.distributed:
        store.finalize()
        return
    dist.barrier()
    missing = broadcast(info, store.missing() if info.is_main else None)
    mine = {s: store.read_shard(s) for s in missing if store.has(s)}
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    error: list[Any] = [None]
    if info.is_main:
        try:
            for part in gathered or []:
                for s, counts in (part or {}).items():
                    if not store.has(s):
                        store.write_shard(s, counts)
            store.finalize()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = [str(exc)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"merging the count store failed on rank 0: {error[0]}")
