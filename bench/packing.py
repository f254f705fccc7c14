"""Padding-free training against padded micro-batches, on the real mixture and checkpoint, in one run: real (unpadded)
tokens a second and the padded share of one training pass (forward and backward) over the same global batches, for
ours packed (the default), ours padded (--padded, the release's micro-batches) and transformers padded.

    python data.py prepare --source DIR --out mix          # DIR/<task>/<split>.jsonl, or --source hub
    python bench/packing.py --model CHECKPOINT --data mix --micro-batch 8 16 32 --steps 2 --json out.json

Each step is a global batch of --batch-size examples drawn as train.py draws them (seed 20), the three variants one
after the other on it, after one untimed warm-up pass each; the optimizer step is left out (the same for all). The
positions each runs bound the gain: packed can be at most (positions padded / positions packed) times faster when a
pass costs in proportion to its positions.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project sits one folder up
import data  # noqa: E402
from model import Transformer  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", required=True, help="checkpoint folder in hub layout")
ap.add_argument("--data", required=True, help="mixture folder (python data.py prepare)")
ap.add_argument("--batch-size", type=int, default=64, help="examples a step (the paper's 64)")
ap.add_argument("--micro-batch", type=int, nargs="+", default=[8, 16, 32])
ap.add_argument("--steps", type=int, default=2, help="global batches timed per micro-batch size")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--no-transformers", action="store_true", help="leave transformers out")
ap.add_argument("--count-only", action="store_true", help="only the positions each layout runs (no model, no timing)")
ap.add_argument("--json", default=None, help="write the figures here too")
args = ap.parse_args()
torch.set_num_threads(args.threads)

tok, eos = data.load_tokenizer(args.model)
mixture = data.load_mixture(args.data)
enc, _ = data.encode_mixture(tok, eos, mixture, 512, args.data)
sampler = data.MixtureSampler({t: len(e) for t, e in enc.items()}, args.batch_size, 20)
batches = [[enc[t][i] for t, i in sampler.next_batch()] for _ in range(args.steps)]
if args.count_only:
    print("| micro-batch | layout | positions run | padded share | bound on the gain |\n|---|---|---|---|---|")
    for micro in args.micro_batch:
        counts = {}
        for packed in (True, False):
            passes = [(b, p) for b in batches for p in data.forward_passes(b, 0, 1, micro, eos, packed)]
            counts[packed] = (sum(idx.numel() for _, (_, (idx, *_)) in passes),
                              sum(len(b[j][0]) - 1 for b, (part, _) in passes for j in part))
        for packed, name in ((True, "default (packed where it pays)"), (False, "padded")):
            pos, real = counts[packed]
            print(f"| {micro} | {name} | {pos} | {1 - real / pos:.1%} | {counts[False][0] / pos:.2f}x |")
    sys.exit(0)
ours = Transformer.from_pretrained(args.model)
hf = None
if not args.no_transformers:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")


def ours_pass(batch, micro, packed):
    real = padded = 0
    for part, (idx, targets, pos, docs) in data.forward_passes(batch, 0, 1, micro, eos, packed):
        ours(idx, targets, pos=pos, docs=docs).sum().backward()
        real, padded = real + sum(len(batch[j][0]) - 1 for j in part), padded + idx.numel()
    return real, padded


def hf_pass(batch, micro):
    real = padded = 0
    for part, (idx, targets, _, _) in data.forward_passes(batch, 0, 1, micro, eos, packed=False):
        mask = torch.zeros_like(idx)
        for b, j in enumerate(part):
            mask[b, :len(batch[j][0]) - 1] = 1
        logits = hf(input_ids=idx, attention_mask=mask).logits  # (its own loss would shift the shifted labels)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                          reduction="sum").backward()
        real, padded = real + int(mask.sum()), padded + idx.numel()
    return real, padded


variants = {"ours, packed": lambda b, m: ours_pass(b, m, True), "ours, padded": lambda b, m: ours_pass(b, m, False)}
if hf is not None:
    variants["transformers, padded"] = hf_pass
rows = []
print("| micro-batch | variant | positions run | padded share | real tokens/s | real tokens/s / ours padded |\n"
      "|---|---|---|---|---|---|",
      flush=True)
for micro in args.micro_batch:
    for fn in variants.values():  # warm-up
        fn(batches[0][:micro], micro)
    seconds, real, padded = ({name: 0.0 for name in variants} for _ in range(3))
    for batch in batches:
        for name, fn in variants.items():
            t0 = time.time()
            r, p = fn(batch, micro)
            seconds[name] += time.time() - t0
            real[name], padded[name] = real[name] + r, padded[name] + p
            (ours if name.startswith("ours") else hf).zero_grad(set_to_none=True)
    for name in variants:
        rows.append({"micro_batch": micro, "variant": name, "real_tok_per_s": real[name] / seconds[name],
                     "padded_share": 1 - real[name] / padded[name], "positions": padded[name],
                     "seconds": seconds[name]})
    base = rows[-len(variants) + 1]["real_tok_per_s"]  # ours, padded
    for r in rows[-len(variants):]:
        print(f"| {micro} | {r['variant']} | {r['positions']:.0f} | {r['padded_share']:.1%} | {r['real_tok_per_s']:.0f} | "
              f"{r['real_tok_per_s'] / base:.2f}x |", flush=True)
if args.json:
    Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))
