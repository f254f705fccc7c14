"""The one place that knows about ranks (STYLE rule 7): process-group setup, rank-0 printing, sums over ranks.

    torchrun --standalone --nproc_per_node=8 train.py ...     # NCCL on GPUs, gloo on CPUs; RANK etc. from torchrun
    python train.py ...                                       # one process: no process group, the same code path

Every rank reaches every collective: callers sum counts with all_sum, and rank 0 alone writes files.
"""
import os

import torch
import torch.distributed as dist


def setup(device_flag: str | None = None):
    """(ddp, rank, local_rank, world_size, device); the process group is started once, under torchrun."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    kind = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
    return ddp, rank, local_rank, world, device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(x: float, device) -> float:
    if dist.is_initialized():
        t = torch.tensor(float(x), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()
    return x


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
