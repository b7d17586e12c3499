"""This process's place in a multi-process launch (torchrun, accelerate launch): its rank and the world size, read
from the environment the launcher sets, and the process group the datastore build's barriers need."""
from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a launch."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes what all of them share (the rank-0 process, or the only one)."""
    return rank_and_world()[0] == 0


def start_group() -> tuple[int, int]:
    """(rank, world size), with the process group started under a launch of several processes."""
    import torch  # (here: the CLI reads the rank without loading torch)

    rank, world = rank_and_world()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def barrier(world: int) -> None:
    if world > 1:
        import torch

        torch.distributed.barrier()
