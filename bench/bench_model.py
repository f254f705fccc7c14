"""Speed of our decoder (model.py) against transformers on the same checkpoint, batch and sequence length.

    python bench/bench_model.py                       # CPU, fp32, the real SmolLM2-135M-Instruct, batch 4 x 256
    python bench/bench_model.py --device cuda --shape qwen2.5-0.5b --batch-size 8 --seq-len 1024   # GPU, bf16, MFU
    python bench/bench_model.py --device cpu --shape tiny --dtype bfloat16    # the GPU path, as a smoke test on a CPU
    python bench/bench_model.py --threads 1 --clock cpu    # a CPU shared with other jobs: count our CPU time only

Times a forward pass (no grad) and a training step (forward, cross-entropy, backward, AdamW), eager and under
torch.compile (both models compiled), and prints | what | ours | transformers | ratio | with the model FLOP
utilisation of ours (MFU, against --peak-tflops). Warmup steps are left out and the median of the timed steps is
reported; ours and transformers alternate step by step.
--shape builds a random-weight model from a ModelConfig instead of loading --model (transformers then loads the
same weights, saved by us into a temporary folder). transformers is only the yardstick here: `pip install
transformers` (requirements-dev.txt); the project itself never imports it.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: model.py sits one folder up
from model import ModelConfig, Transformer  # noqa: E402

# random-weight shapes for --shape; "tiny" runs the GPU path on a CPU quickly
SHAPES = {
    "qwen2.5-0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                                n_kv_heads=2, head_dim=64, hidden_dim=4864, norm_eps=1e-6, rope_theta=1e6,
                                max_seq_len=32768, qkv_bias=True, tie_embeddings=True),
    "tiny": ModelConfig(model_type="qwen2", vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, hidden_dim=128, norm_eps=1e-6, max_seq_len=1024, qkv_bias=True,
                        tie_embeddings=True),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
# what to run
parser.add_argument("--model", default=str(Path.home() / ".cache/msft-real/smollm2-135m-instruct"),
                    help="checkpoint folder in hub layout (default: ../shared/tools/get-smollm2.sh's folder)")
parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="bfloat16: autocast over fp32 weights (default: bfloat16 on cuda, float32 on cpu)")
# how much
parser.add_argument("--batch-size", type=int, default=4, help="rows per step")
parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (compilation happens here)")
parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported")
parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this thread's CPU time, which other jobs on the machine do not "
                         "inflate (needs --threads 1 on the CPU: other threads' work would go uncounted)")
# mfu
parser.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense TFLOP/s of the device for MFU (H100 SXM bf16: 989)")
args = parser.parse_args()

if args.device.split(":")[0] not in ("cpu", "cuda"):
    parser.error(f"--device {args.device!r}: expected cpu or cuda")
if args.device.startswith("cuda") and not torch.cuda.is_available():
    parser.error(f"--device {args.device}: no CUDA device is visible to torch")
for flag in ("batch_size", "seq_len", "steps"):
    if getattr(args, flag) < 1:
        parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
if args.warmup < 1:
    parser.error(f"--warmup {args.warmup}: expected at least 1 (the first step pays for allocation/compilation)")
if not args.shape and not (Path(args.model) / "config.json").is_file():
    parser.error(f"--model {args.model}: no config.json there; build it with ../shared/tools/get-smollm2.sh "
                 "or pass --shape")
try:
    import transformers
except ImportError:
    sys.exit("bench_model.py compares against transformers: pip install -r requirements-dev.txt")

if args.threads is not None and args.threads < 1:
    parser.error(f"--threads {args.threads}: expected a positive integer")
if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
    parser.error("--clock cpu: expected --threads 1 and --device cpu (it counts the calling thread only)")
if args.threads is not None:
    torch.set_num_threads(args.threads)
clock = time.thread_time if args.clock == "cpu" else time.perf_counter
device_type = args.device.split(":")[0]
dtype = args.dtype or ("bfloat16" if device_type == "cuda" else "float32")
autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
torch.manual_seed(0)

# -----------------------------------------------------------------------------
# the two models, same weights in fp32

with tempfile.TemporaryDirectory() as tmp:
    if args.shape:
        ours = Transformer(SHAPES[args.shape])
        ours.save_pretrained(Path(tmp) / "model")
        source = Path(tmp) / "model"
    else:
        ours = Transformer.from_pretrained(args.model)
        source = args.model
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
ours.to(args.device).train()
hf.to(args.device).train()  # neither model has dropout: train() and eval() compute the same
cfg = ours.config
# a tied head counted once: the embedding lookup costs nothing, the head's matmul is the 2·N
n_params = sum(p.numel() for p in ours.parameters())

batch = torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=args.device)
idx, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each

with torch.no_grad(), autocast:
    diff = (ours(idx) - hf(idx, use_cache=False).logits.float()).abs().max().item()
print(f"{args.shape or args.model}: {n_params / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len}, "
      f"{dtype} on {args.device}, {args.clock} clock, {torch.get_num_threads()} CPU threads (load average "
      f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); max |logit difference| ours vs transformers: {diff:.2e}")

# -----------------------------------------------------------------------------
# timing


def timed(ours_fn, hf_fn) -> tuple[float, float]:
    """Median seconds of each fn over args.steps calls, after args.warmup untimed ones. The two alternate step by
    step, so a load that comes and goes on a shared machine falls on both alike."""
    times = ([], [])
    for i in range(args.warmup + args.steps):
        for fn, ts in zip((ours_fn, hf_fn), times):
            if device_type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if device_type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                ts.append(clock() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def steps(forward, model):
    """(forward, train step) closures over forward(idx) -> logits, with a fresh AdamW on model's parameters."""
    # fused: one pass over the parameters (CPU too), so the step times the models more than the optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    @torch.no_grad()
    def fwd():
        with autocast:
            forward(idx)

    def train_step():
        with autocast:
            logits = forward(idx)  # (B, T, vocab)
        # the same loss outside both models, so both do the same work
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fwd, train_step


def hf_forward(model):
    return lambda x: model(x, use_cache=False).logits


# -----------------------------------------------------------------------------
# run and report

# training costs 6·N per token, a forward 2·N; attention adds 12·L·d·T (3x the forward's 4·L·d·T, d = heads x
# head_dim), causal masking not halved, as in the PaLM paper's appendix B
tokens = args.batch_size * args.seq_len
attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * args.seq_len
flops = {"forward": (2 * n_params + attn) * tokens, "train step": (6 * n_params + 3 * attn) * tokens}
print(f"\n| what | ours | transformers | ratio (transformers / ours) | ours: TFLOP/s, MFU of {args.peak_tflops:g} |")
print("|---|---|---|---|---|", flush=True)
# the compiled wrappers share the parameters of the modules they wrap, which stay uncompiled
variants = [("", ours, hf)] + ([] if args.no_compile else [("compiled ", torch.compile(ours), torch.compile(hf))])
for prefix, o, h in variants:
    for what, ours_fn, hf_fn in zip(("forward", "train step"), steps(o, ours), steps(hf_forward(h), hf)):
        t_ours, t_hf = timed(ours_fn, hf_fn)
        tflops = flops[what] / t_ours / 1e12
        print(f"| {prefix}{what} | {t_ours * 1e3:.1f} ms | {t_hf * 1e3:.1f} ms | {t_hf / t_ours:.2f}x | "
              f"{tflops:.3g}, {tflops / args.peak_tflops:.1%} |", flush=True)
