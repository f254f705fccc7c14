"""Where a training step's memory goes on the CPU: the process's peak resident memory (Linux VmHWM, reset between
phases through /proc/self/clear_refs) after loading, in the forward pass, the backward pass and Adam's step.

    python bench/cpu_step_memory.py --model CHECKPOINT --data MIXTURE --micro-batch 8 --max-len 256
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project sits one folder up
import data  # noqa: E402
from model import Transformer  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", required=True, help="checkpoint folder in hub layout")
ap.add_argument("--data", required=True, help="mixture folder (python data.py prepare)")
ap.add_argument("--micro-batch", type=int, default=8, help="examples a step, in one forward pass")
ap.add_argument("--max-len", type=int, default=256)
ap.add_argument("--steps", type=int, default=2, help="the second step shows what the allocator keeps")
args = ap.parse_args()
torch.set_num_threads(2)


def gib(key: str) -> float:  # VmRSS (now) or VmHWM (the peak since the last reset)
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 2**20


def reset():
    Path("/proc/self/clear_refs").write_text("5")


tok, eos = data.load_tokenizer(args.model)
enc, _ = data.encode_mixture(tok, eos, data.load_mixture(args.data), args.max_len, args.data)
sampler = data.MixtureSampler({t: len(e) for t, e in enc.items()}, args.micro_batch, 20)
batch = [enc[t][i] for t, i in sampler.next_batch()]
print(f"python, torch, tokenizer, data: {gib('VmRSS'):.2f} GiB")
model = Transformer.from_pretrained(args.model)
n = sum(p.numel() for p in model.parameters())
print(f"+ weights ({n / 1e6:.1f}M x 4 bytes = {4 * n / 2**30:.2f} GiB): {gib('VmRSS'):.2f} GiB")
opt = torch.optim.Adam(model.parameters(), lr=1e-5)
for step in range(args.steps):
    reset()
    before = gib("VmRSS")
    for part, (idx, targets, pos, docs) in data.forward_passes(batch, 0, 1, args.micro_batch, eos):
        loss = model(idx, targets, pos=pos, docs=docs).sum()
        print(f"step {step}: pass {tuple(idx.shape)}, after forward {gib('VmRSS'):.2f} GiB "
              f"(+{gib('VmRSS') - before:.2f}: the activations kept for backward)")
        loss.backward()
    print(f"step {step}: forward+backward peak {gib('VmHWM'):.2f} GiB, after backward {gib('VmRSS'):.2f} "
          f"(gradients {4 * n / 2**30:.2f})")
    reset()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"step {step}: Adam step peak {gib('VmHWM'):.2f} GiB (moments {8 * n / 2**30:.2f}), after, gradients "
          f"freed: {gib('VmRSS'):.2f}")
