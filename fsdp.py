"""FSDP2 for train.py --fsdp: parameters, gradients and Adam states sharded over the ranks, for models that do not
fit whole on one GPU.

    torchrun --standalone --nproc_per_node=8 train.py --method msft --model Qwen/Qwen2.5-7B --data mix --fsdp

FSDPRun is train.Run with what sharding changes: the model is built on the meta device, each block and then the root
fully_shard'ed (torchtitan's order) and each rank fills only its rows of every weight; mixed precision is FSDP's
policy (bf16 copies of the gathered blocks, fp32 gradient reduction) instead of autocast; every rank snapshots,
restores and checkpoints its own shard (its own snapshot store and state files: no gather on a roll-back); the whole
model is gathered for decoding, and one tensor at a time for saving. A resume needs the same world size.
"""
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import train
from model import Transformer


def shard(model: Transformer, mp: MixedPrecisionPolicy):
    """fully_shard each decoder block, then the root (embedding, final norm, head), as torchtitan does. A block's
    parameters are all-gathered for its forward and backward and freed after."""
    for i, block in enumerate(model.layers):
        # the last block's backward comes right after its forward: no point in freeing it in between
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mp_policy=mp)


def fill(param: torch.Tensor, full: torch.Tensor):
    """Copy a checkpoint tensor into this rank's rows of a parameter sharded on dim 0 (FSDP2 cuts dim 0 as
    torch.chunk does; the ranks past the last chunk hold none)."""
    if isinstance(param, DTensor):
        rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
        chunks = full.chunk(world, dim=0)
        full = chunks[rank] if rank < len(chunks) else full[:0]
        param = param.to_local()
    if param.shape != full.shape:
        raise ValueError(f"a parameter of shape {tuple(param.shape)} cannot take a tensor of shape {tuple(full.shape)}")
    param.copy_(full)


@contextmanager
def unsharded(model: Transformer):
    """The whole model on every rank while inside, for decoding: one all-gather of each block, not one per generated
    token; the evaluation then runs on each rank alone, as under DDP."""
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


class FSDPRun(train.Run):
    def load_model(self, model_dir, dtype) -> Transformer:
        self.holds_snapshots = True  # every rank its own shard of everything
        self.part = f"rank{self.rank:05d}-of-{self.world:05d}"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "mixed" else None, reduce_dtype=dtype)
        self.autocast = nullcontext()  # the policy computes in bf16 over fp32 shards
        return Transformer.from_pretrained(model_dir, device=self.device, dtype=dtype, fill=fill,
                                           prepare=lambda m: shard(m, mp))

    @staticmethod
    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    @staticmethod
    def like(param, t):
        return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())

    def snapshot(self) -> dict:
        return {k: self.local(v).detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if not (self.model.config.tie_embeddings and k == "lm_head.weight")}

    def restore(self, params: dict):
        """Each rank copies its own shard back: no rank gathers or sends anything."""
        self.segment = None
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if k in params:
                    self.local(v).copy_(params[k])
        self.new_optimizer()

    def evaluate(self, *args, **kw):
        with unsharded(self.model):
            return super().evaluate(*args, **kw)

    def full_tensors(self):
        """(name, whole tensor) one at a time, each all-gathered: every rank must go through all of them (the gathers
        are collectives); a rank never holds more than one whole tensor beside its shard."""
        for k, v in self.model.state_dict().items():
            yield k, v.full_tensor() if isinstance(v, DTensor) else v
