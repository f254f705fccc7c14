"""GPU memory per rank for fine-tuning the paper's models: a table computed from the shapes, and a measurement.

    python bench/memory.py                           # the table: 6 models x world 1/4/8/16 x DDP/FSDP x precision x AC
    python bench/memory.py --measure --json out.json # on a GPU: Qwen2.5-0.5B shape at world 1, measured beside the table

What a rank holds while it trains (bytes; N parameters, W ranks, S = W under FSDP, 1 under DDP):
- weights, gradients, Adam's two moments: 4 + 4 + 8 bytes a parameter with fp32 weights (train.py --precision mixed or
  fp32), 2 + 2 + 4 with --precision bf16 (the release's pure bf16); each divided by S.
- compute copies: with fp32 weights the blocks compute in bf16; DDP's autocast keeps a bf16 copy of every weight
  for the step (2 N); FSDP gathers bf16 copies of the root (embedding, head) and about two blocks at a time, plus a
  block's unsharded fp32 gradient before its reduce-scatter.
- activations of one micro-batch (--micro-batch rows of 512 tokens, T tokens): per block the tensors our code keeps
  for the backward pass (block_activation_bytes, read off model.py and checked byte for byte against autograd's
  saved tensors by tests/test_memory.py), plus the head's logits (10 bytes a token and vocabulary entry at the peak: bf16 logits,
  their fp32 copy and log-softmax) as if every token were an answer token (the worst case: training runs the head
  only where there is a target, for the multiple-choice tasks a few tokens a row); with --activation-checkpointing each block keeps only its input, and one block
  is recomputed at a time.
Roll-back snapshots live in host memory, not on the GPU: one snapshot is 4 N / S bytes (fp32) or 2 N / S (bf16) per
rank (DDP: rank 0 holds them whole); at most active tasks + 1 are held, the column shows the worst case of 11.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project sits one folder up
import flops  # noqa: E402
from model import ModelConfig  # noqa: E402

GB = 1e9
MODELS = {  # the paper's six models, their config.json shapes
    "OLMo 2 1B": ModelConfig(model_type="olmo2", vocab_size=100352, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                             head_dim=128, hidden_dim=8192, qk_norm="all", post_norm=True, tie_embeddings=False),
    "Qwen2.5 0.5B": ModelConfig(model_type="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                head_dim=64, hidden_dim=4864, qkv_bias=True, tie_embeddings=True),
    "Qwen2.5 1.5B": ModelConfig(model_type="qwen2", vocab_size=151936, dim=1536, n_layers=28, n_heads=12,
                                n_kv_heads=2, head_dim=128, hidden_dim=8960, qkv_bias=True, tie_embeddings=True),
    "Qwen2.5 3B": ModelConfig(model_type="qwen2", vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2,
                              head_dim=128, hidden_dim=11008, qkv_bias=True, tie_embeddings=True),
    "Qwen2.5 7B": ModelConfig(model_type="qwen2", vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                              head_dim=128, hidden_dim=18944, qkv_bias=True, tie_embeddings=False),
    "Qwen3 8B": ModelConfig(model_type="qwen3", vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8,
                            head_dim=128, hidden_dim=12288, qk_norm="head", tie_embeddings=False),
}
FIT = 72e9  # an 80 GB GPU, less 10% for the allocator's fragmentation, cuBLAS workspaces and the CUDA context


def block_activation_bytes(cfg, tokens: int, residual_bytes: int) -> int:
    """What one pre-norm block keeps for its backward pass, bf16 compute, residual stream of residual_bytes: 4
    under autocast over fp32 weights (DDP's path), 2 in bf16 (FSDP's mixed precision, pure bf16). Per token, read off
    model.py: each RMSNorm keeps its input as fp32, 1 / rms, and its result before and after the weight (under
    autocast both fp32, then cast to bf16 anew by each of the 3 + 2 projections that read it); rotary keeps cos and
    sin; attention keeps q, k, v, its output (also the output projection's input) and the log-sum-exp; the SwiGLU
    MLP gate, silu, up and their product. (The bf16 weight copies autocast keeps are counted apart.)"""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.hidden_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    if residual_bytes == 4:
        norms = (4 * d + 4 + 4 * d + 3 * 2 * d) + (4 * d + 4 + 4 * d + 2 * 2 * d)
        rope = 2 * 4 * hd
    else:
        norms = 2 * (4 * d + 4 + 2 * d + 2 * d)
        rope = 2 * 2 * hd
    attention = 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * cfg.n_heads
    return tokens * (norms + rope + attention + 8 * f)


def estimate(cfg, world: int, fsdp: bool, precision: str, checkpointing: bool, micro_batch: int = 4,
             seq: int = 512, snapshots: int = 11) -> dict:
    """Bytes per rank (see the module docstring), by what holds them."""
    n = flops.param_count(cfg)["total"]
    w = 4 if precision == "fp32" else 2
    s = world if fsdp else 1
    tokens = micro_batch * seq
    blocks = flops.param_count(cfg)["non_embedding"] - cfg.dim
    block = blocks // cfg.n_layers
    root = n - blocks
    if fsdp:  # bf16 copies of the root and two blocks gathered, a block's fp32 gradient before its reduce-scatter
        compute = 2 * (root + 2 * block) + 4 * block
    else:  # autocast's bf16 copy of every fp32 weight; nothing extra in pure bf16
        compute = 2 * n if precision == "fp32" else 0
    residual = 4 if precision == "fp32" and not fsdp else 2
    one = block_activation_bytes(cfg, tokens, residual)
    kept = cfg.n_layers * (tokens * cfg.dim * residual + (0 if checkpointing else one)) + (one if checkpointing else 0)
    head = 10 * tokens * cfg.vocab_size
    out = {"weights": w * n / s, "gradients": w * n / s, "optimizer": 2 * w * n / s, "compute copies": compute,
           "activations": kept + head}
    out["total"] = sum(out.values())
    out["snapshots (host)"] = snapshots * w * n / s
    return out


def table(micro_batch: int = 4) -> str:
    lines = ["| model | params | world | engine | precision | act. ckpt | weights+grads+Adam | compute copies | "
             f"activations | total GB per GPU | fits 80 GB (< 72) | 11 snapshots, host GB per rank |",
             "|---" * 12 + "|"]
    for name, cfg in MODELS.items():
        n = flops.param_count(cfg)["total"]
        for world in (1, 4, 8, 16):
            for fsdp in (False, True):
                if fsdp and world == 1:
                    continue
                for precision in ("fp32", "bf16"):
                    for ac in (False, True):
                        e = estimate(cfg, world, fsdp, precision, ac, micro_batch)
                        state = e["weights"] + e["gradients"] + e["optimizer"]
                        lines.append(f"| {name} | {n / 1e9:.2f}B | {world} | {'FSDP' if fsdp else 'DDP'} | "
                                     f"{precision} | {'yes' if ac else 'no'} | {state / GB:.1f} | "
                                     f"{e['compute copies'] / GB:.1f} | {e['activations'] / GB:.1f} | "
                                     f"{e['total'] / GB:.1f} | {'yes' if e['total'] < FIT else 'no'} | "
                                     f"{e['snapshots (host)'] / GB:.1f} |")
    return "\n".join(lines)


def measure(micro_batch: int, steps: int = 3) -> list[dict]:
    """Peak torch.cuda.max_memory_allocated of train.py's training step (loss, backward, fused Adam) for a
    random-weight Qwen2.5-0.5B at world 1: plain (DDP's path: fp32 weights, bf16 autocast) and FSDP (bf16
    mixed precision over fp32 shards), with and without activation checkpointing, beside the table's estimate."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from fsdp import FSDPRun, shard
    from model import Transformer, rope_inv_freq
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    cfg = MODELS["Qwen2.5 0.5B"]
    rows = []
    for fsdp in (False, True):
        for ac in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.device("meta"):
                model = Transformer(cfg)
            if fsdp:
                shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
            model.to_empty(device="cuda")
            if cfg.tie_embeddings and model.lm_head.weight is not model.embed.weight:
                model.lm_head.weight = model.embed.weight
            torch.manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    FSDPRun.local(p).normal_(0, 0.02)
            model.inv_freq = rope_inv_freq(cfg).cuda()
            for block in model.layers:
                block.checkpointing = ac
            opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=True)
            autocast = torch.autocast("cuda", torch.bfloat16, enabled=not fsdp)
            idx = torch.randint(cfg.vocab_size, (micro_batch, 513), device="cuda")
            t0 = time.time()
            for _ in range(steps):
                with autocast:
                    loss = model(idx[:, :-1], idx[:, 1:]).sum() / idx[:, 1:].numel()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            est = estimate(cfg, 1, fsdp, "fp32", ac, micro_batch)["total"]
            peak = torch.cuda.max_memory_allocated()
            rows.append({"engine": "FSDP" if fsdp else "DDP (plain)", "activation_checkpointing": ac,
                         "micro_batch": micro_batch, "measured_gb": peak / GB, "estimate_gb": est / GB,
                         "estimate_over_measured": est / peak, "seconds_per_step": (time.time() - t0) / steps})
            print(f"| {rows[-1]['engine']} | {'yes' if ac else 'no'} | {peak / GB:.2f} | {est / GB:.2f} | "
                  f"{est / peak:.2f} |", flush=True)
            del model, opt, loss
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=4, help="rows of 512 tokens a forward pass (the release: 4)")
    ap.add_argument("--measure", action="store_true", help="also measure on this machine's GPU (needs CUDA)")
    ap.add_argument("--json", default=None, help="write the measurement here")
    a = ap.parse_args()
    if a.micro_batch < 1:
        ap.error(f"--micro-batch {a.micro_batch}: expected a positive integer")
    print(table(a.micro_batch))
    if a.measure:
        import torch
        if not torch.cuda.is_available():
            ap.error("--measure: no CUDA device is visible to torch")
        print("\n| engine, world 1, Qwen2.5-0.5B shape | act. ckpt | measured peak GB | table's estimate GB | "
              "estimate / measured |\n|---|---|---|---|---|", flush=True)
        rows = measure(a.micro_batch)
        if a.json:
            Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
