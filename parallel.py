"""The one place that knows about ranks (STYLE rule 7): process-group setup, rank-0 printing, sums over ranks.

    torchrun --standalone --nproc_per_node=8 train.py ...     # NCCL on GPUs, gloo on CPUs; RANK etc. from torchrun
    python train.py ...                                       # one process: no process group, the same code path

Every rank reaches every collective: callers sum counts with all_sum, and rank 0 alone writes files.
"""
import os
from contextlib import contextmanager

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


# -----------------------------------------------------------------------------
# FSDP2: parameters, gradients and Adam states sharded over the ranks (torch.distributed.fsdp.fully_shard)

def shard(model, param_dtype=None, reduce_dtype=None):
    """fully_shard each decoder block, then the root (embedding, final norm, head), as torchtitan does. A block's
    parameters are all-gathered for its forward and backward and freed after; param_dtype is the compute dtype
    (bf16 over fp32 master shards), reduce_dtype the gradients' reduce-scatter dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(model.layers):
        # the last block's backward comes right after its forward: no point in freeing it in between
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@contextmanager
def gathered(model, sharded: bool):
    """The whole model unsharded on every rank while inside, e.g. for decoding: one all-gather of each block,
    not one per generated token; the evaluation then runs on each rank alone, as under DDP."""
    if not sharded:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for block in model.layers:
        block.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for i, block in enumerate(model.layers):
            block.set_reshard_after_forward(i < len(model.layers) - 1, recurse=False)
        for m in units:
            m.reshard()


def full_tensors(state_dict: dict):
    """(name, whole tensor) one at a time, a sharded one all-gathered: every rank must go through all of them (the
    gathers are collectives); a rank never holds more than one whole tensor beside its shard."""
    for k, v in state_dict.items():
        yield k, v.full_tensor() if hasattr(v, "full_tensor") else v
