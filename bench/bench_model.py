"""Speed of our decoder (model.py) against transformers on the same checkpoint, batch and sequence length.

    python bench/bench_model.py                       # CPU, fp32, the real SmolLM2-135M-Instruct, batch 4 x 256
    python bench/bench_model.py --device cuda --shape qwen2.5-0.5b --seq-len 512 --batch-size auto --train-only \
        --warmup 2 --steps 5 --json out.json          # GPU: bf16 training MFU, the batch sized to fill the GPU
    python bench/bench_model.py --device cpu --shape tiny --dtype bfloat16    # the GPU path, as a smoke test on a CPU
    python bench/bench_model.py --threads 1 --clock cpu    # a CPU shared with other jobs: count our CPU time only

Times a forward pass (no grad) and a training step (forward, cross-entropy, backward, fused AdamW), eager and under
torch.compile (both models compiled; the loss outside them, as in train.py), and prints | what | ours | transformers
| ratio | with the model FLOP utilisation (MFU, against --peak-tflops) of both. Warmup steps are left out and the
median of the timed steps is reported; ours and transformers alternate step by step. transformers runs with
attn_implementation="sdpa", the kernel ours calls. --batch-size auto (CUDA) measures the peak memory of eager
training steps at 2 and 4 rows, fits fixed + rows x per-row, and takes the largest batch (a multiple of 8, at most
--max-batch) predicted to fit in 85% of the GPU's memory with both models and both optimizers held.
--shape builds a random-weight model from a ModelConfig instead of loading --model (transformers then loads the
same weights, saved by us into a temporary folder). transformers is only the yardstick here: `pip install
transformers` (requirements-dev.txt); the project itself never imports it.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: model.py sits one folder up
import hub  # noqa: E402
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
FLOPS_CONVENTION = ("training step 6*N + 12*L*H*hd*T FLOPs per token, forward 2*N + 4*L*H*hd*T (N all parameters, "
                    "a tied embedding counted once; attention not halved for the causal mask: PaLM, appendix B)")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
# what to run
parser.add_argument("--model", default=os.environ.get("MSFT_SMOLLM2"),
                    help="checkpoint folder in hub layout (default: $MSFT_SMOLLM2)")
parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="bfloat16: autocast over fp32 weights (default: bfloat16 on cuda, float32 on cpu)")
# how much
parser.add_argument("--batch-size", default="4", help="rows per step, or auto (CUDA: as many as fit, see above)")
parser.add_argument("--max-batch", type=int, default=64, help="cap on --batch-size auto")
parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (compilation happens here)")
parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported")
parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
parser.add_argument("--train-only", action="store_true", help="skip the forward-only rows (and their compilation)")
parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this thread's CPU time, which other jobs on the machine do not "
                         "inflate (needs --threads 1 on the CPU: other threads' work would go uncounted)")
# mfu and output
parser.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense TFLOP/s of the device for MFU (H100 SXM bf16: 989)")
parser.add_argument("--json", help="also write the settings and the table to this JSON file")
args = parser.parse_args()

if args.device.split(":")[0] not in ("cpu", "cuda"):
    parser.error(f"--device {args.device!r}: expected cpu or cuda")
if args.device.startswith("cuda") and not torch.cuda.is_available():
    parser.error(f"--device {args.device}: no CUDA device is visible to torch")
if args.batch_size == "auto":
    if not args.device.startswith("cuda"):
        parser.error("--batch-size auto: expected --device cuda (it sizes the batch to the GPU's memory)")
elif not args.batch_size.isdigit():
    parser.error(f"--batch-size {args.batch_size!r}: expected a positive integer or auto")
for flag in ("seq_len", "steps", "max_batch"):
    if getattr(args, flag) < 1:
        parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
if args.batch_size != "auto" and int(args.batch_size) < 1:
    parser.error(f"--batch-size {args.batch_size}: expected a positive integer or auto")
if args.warmup < 1:
    parser.error(f"--warmup {args.warmup}: expected at least 1 (the first step pays for allocation/compilation)")
if not args.shape and not (args.model and (Path(args.model) / "config.json").is_file()):
    parser.error(f"--model {args.model}: no config.json there (a checkpoint folder in hub layout), or pass --shape")
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
cuda = device_type == "cuda"
dtype = args.dtype or ("bfloat16" if cuda else "float32")
autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
torch.manual_seed(0)

# -----------------------------------------------------------------------------
# the two models, same weights in fp32

with tempfile.TemporaryDirectory() as tmp:
    if args.shape:
        ours = Transformer(SHAPES[args.shape])
        hub.save_pretrained(ours, Path(tmp) / "model")
        source = Path(tmp) / "model"
    else:
        ours = Transformer.from_pretrained(args.model)
        source = args.model
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
ours.to(args.device).train()
hf.to(args.device).train()  # neither model has dropout: train() and eval() compute the same
cfg = ours.config
# a tied head counted once: the embedding lookup costs nothing, the head's matmul is the 2·N
n_params = sum(p.numel() for p in ours.parameters())


def random_batch(rows: int):
    batch = torch.randint(cfg.vocab_size, (rows, args.seq_len + 1), device=args.device)
    return batch[:, :-1], batch[:, 1:]  # (B, T) inputs and next-token targets


with torch.no_grad(), autocast:  # two rows are enough to see a difference, and keep a big batch's logits off the GPU
    probe = random_batch(2)[0]
    diff = (ours(probe) - hf(probe, use_cache=False).logits.float()).abs().max().item()

# -----------------------------------------------------------------------------
# timing


def timed(ours_fn, hf_fn) -> tuple[float, float]:
    """Median seconds of each fn over args.steps calls, after args.warmup untimed ones. The two alternate step by
    step, so a load that comes and goes on a shared machine falls on both alike."""
    times = ([], [])
    for i in range(args.warmup + args.steps):
        for fn, ts in zip((ours_fn, hf_fn), times):
            if cuda:
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                ts.append(clock() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def steps(forward, model):
    """(forward(idx), train_step(idx, targets)) closures over forward(idx) -> logits, with a fresh AdamW on model's
    parameters (its state is allocated by the first step and lives as long as the closures)."""
    # fused: one pass over the parameters (CPU too), so the step times the models more than the optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    @torch.no_grad()
    def fwd(idx, targets=None):
        with autocast:
            forward(idx)

    def train_step(idx, targets):
        with autocast:
            logits = forward(idx)  # (B, T, vocab)
        # the same loss outside both models, so both do the same work
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"forward": fwd, "train step": train_step}


def hf_forward(model):
    return lambda x: model(x, use_cache=False).logits


def free_gpu():
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def auto_batch_size() -> tuple[int, dict]:
    """The largest batch (see the docstring) predicted to fit, and the fit it came from."""
    train_steps = [steps(ours, ours)["train step"], steps(hf_forward(hf), hf)["train step"]]
    for fn in train_steps:  # allocates both optimizers' state first: timing holds both too
        fn(*random_batch(1))
    fits = []
    for fn in train_steps:
        peaks = {}
        for rows in (2, 4):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn(*random_batch(rows))
            torch.cuda.synchronize()
            peaks[rows] = torch.cuda.max_memory_allocated()
        per_row = max((peaks[4] - peaks[2]) / 2, 2**20)  # a floor against a flat reading: the cap then decides
        fits.append({"fixed_gib": (peaks[2] - 2 * per_row) / 2**30, "per_row_gib": per_row / 2**30})
    del train_steps, fn
    free_gpu()
    budget = 0.85 * torch.cuda.get_device_properties(args.device).total_memory / 2**30
    rows = min(int((budget - f["fixed_gib"]) / f["per_row_gib"]) for f in fits)
    rows = min(rows // 8 * 8 if rows >= 8 else rows, args.max_batch)
    if rows < 1:
        sys.exit(f"--batch-size auto: not even one row of {args.seq_len} tokens fits ({fits}); try a smaller --seq-len")
    return rows, {"budget_gib": budget, "ours": fits[0], "transformers": fits[1], "max_batch": args.max_batch}


def matmul_tflops() -> float:
    """The bf16 matmul rate this GPU reaches (8192^3, median of 10): the ceiling MFU is best read against."""
    a, b = (torch.randn(8192, 8192, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    ts = []
    for i in range(13):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 2 * 8192**3 / statistics.median(ts[3:]) / 1e12


# -----------------------------------------------------------------------------
# run and report

batch_info = "given"
if args.batch_size == "auto":
    batch_size, batch_info = auto_batch_size()
else:
    batch_size = int(args.batch_size)
idx, targets = random_batch(batch_size)
device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
matmul = matmul_tflops() if cuda else None
print(f"{args.shape or args.model}: {n_params / 1e6:.1f}M parameters, batch {batch_size} x {args.seq_len}"
      f"{' (auto: ' + json.dumps(batch_info) + ')' if args.batch_size == 'auto' else ''}, {dtype} on {args.device} "
      f"({device_name}{f', bf16 matmul {matmul:.0f} TFLOP/s measured' if matmul else ''}), {args.clock} clock, "
      f"{torch.get_num_threads()} CPU threads (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); "
      f"max |logit difference| ours vs transformers: {diff:.2e}")

# training costs 6·N per token, a forward 2·N; attention adds 12·L·d·T (3x the forward's 4·L·d·T, d = heads x
# head_dim), causal masking not halved, as in the PaLM paper's appendix B
tokens = batch_size * args.seq_len
attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * args.seq_len
flops = {"forward": (2 * n_params + attn) * tokens, "train step": (6 * n_params + 3 * attn) * tokens}
print(f"\n| what | ours | transformers | ratio (transformers / ours) | TFLOP/s, MFU of {args.peak_tflops:g}: ours "
      f"| transformers |")
print("|---|---|---|---|---|---|", flush=True)
report = {"model": args.shape or args.model, "n_params": n_params, "device": args.device, "device_name": device_name,
          "dtype": dtype, "batch_size": batch_size, "seq_len": args.seq_len, "tokens_per_step": tokens,
          "batch_choice": batch_info, "warmup": args.warmup, "steps": args.steps, "clock": args.clock,
          "max_logit_diff": diff, "peak_tflops": args.peak_tflops, "measured_bf16_matmul_tflops": matmul,
          "flops_convention": FLOPS_CONVENTION, "flops_per_step": flops, "torch": torch.__version__,
          "transformers": transformers.__version__, "rows": []}
for compiled in [False] + ([] if args.no_compile else [True]):
    # the compiled wrappers share the parameters of the modules they wrap, which stay uncompiled
    o, h = (torch.compile(ours), torch.compile(hf)) if compiled else (ours, hf)
    ours_fns, hf_fns = steps(o, ours), steps(hf_forward(h), hf)
    for what in ["train step"] if args.train_only else ["forward", "train step"]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t_ours, t_hf = timed(lambda: ours_fns[what](idx, targets), lambda: hf_fns[what](idx, targets))
        tf_ours, tf_hf = flops[what] / t_ours / 1e12, flops[what] / t_hf / 1e12
        name = ("compiled " if compiled else "") + what
        print(f"| {name} | {t_ours * 1e3:.1f} ms | {t_hf * 1e3:.1f} ms | {t_hf / t_ours:.2f}x | "
              f"{tf_ours:.3g}, {tf_ours / args.peak_tflops:.1%} | {tf_hf:.3g}, {tf_hf / args.peak_tflops:.1%} |",
              flush=True)
        report["rows"].append({
            "what": what, "compiled": compiled, "ours_ms": t_ours * 1e3, "transformers_ms": t_hf * 1e3,
            "transformers_over_ours": t_hf / t_ours, "ours_tflops": tf_ours, "transformers_tflops": tf_hf,
            "ours_mfu": tf_ours / args.peak_tflops, "transformers_mfu": tf_hf / args.peak_tflops,
            "ours_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
        if args.json:  # after every row: a run stopped in compilation keeps the rows before it
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    del ours_fns, hf_fns  # both optimizers' state goes before the next variant makes its own
    free_gpu()
