"""Few-shot greedy evaluation: per-task accuracy and gold-target loss, batched, with a shared-prefix KV cache.

    python data.py prepare --source ../shared/data --out mix        # once: a mixture folder
    python evaluate.py --model /root/.cache/msft-real/smollm2-135m-instruct --data mix --split test --limit 200

Every question of a task is asked after the same `shots` worked examples from the training split (fixed by the seed;
a question that is itself one of them gets other shots), so the keys/values of that shared prefix are computed once
and copied into every batch; only each question's own tokens are run, left-padded, then decoded greedily until
"\\nQ:", EOS or --max-new-tokens. The answer is read after "####" (SPEC section 7). The loss signal is the mean token
cross-entropy of the gold target after the same prompt: one teacher-forced forward, no generation.
Under torchrun, rank r takes every W-th question and the counts are summed, so any W gives the same numbers.
"""
import argparse
import json
import os
import random
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import encode_prompts, format_prompt, format_target, load_mixture, load_tokenizer
from model import KVCache, Transformer, resolve_checkpoint

STOP = "\nQ:"  # a continuation that starts the next question is over

# -----------------------------------------------------------------------------
# answers


def extract_answer(text: str) -> str | None:
    """The answer written after the first "####", up to the end of its line (None when there is none)."""
    if "####" not in text:
        return None
    answer = text.split("####")[1].split("\n")[0].strip()
    return answer or None


def normalize(s: str) -> str | float:
    """A number when the string parses as one ("$1,000." -> 1000.0), else the lowercased stripped string."""
    s = s.strip().lower().removesuffix(".").strip()
    num = s.replace(",", "").removeprefix("$")
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", num):
        return float(num)
    return s


def is_correct(pred: str | None, gold: str) -> bool:
    # a number never equals a string: "1.0" vs "one" is wrong, "1,000" vs "1000.0" is right
    return pred is not None and normalize(pred) == normalize(gold)


# -----------------------------------------------------------------------------
# prompts


def few_shot_prompts(examples, train, shots: int, seed: int) -> tuple[list[tuple[int, ...]], list[str]]:
    """For each example: the indices of its shots in train and its prompt text. The shots are the first `shots`
    of one seeded shuffle of train, skipping any whose question is the one asked (by content, not index), so all
    questions but those few share one prefix."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    keys, texts = [], []
    for ex in examples:
        picked = []
        for i in order:
            if len(picked) == shots:
                break
            if train[i].question.strip() != ex.question.strip():
                picked.append(i)
        if len(picked) < shots:
            raise ValueError(f"only {len(picked)} training examples differ from question {ex.question[:60]!r}; "
                             f"--shots {shots} needs more")
        # official format: "{prompt}{target}" blocks separated by a blank line, then the asked prompt ending "A:"
        blocks = [format_prompt(train[i]) + format_target(train[i]) for i in picked]
        keys.append(tuple(picked))
        texts.append("\n\n".join(blocks + [format_prompt(ex)]))
    return keys, texts


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Longest token prefix shared by all seqs, leaving every seq at least one token of its own (whose logits
    predict the first new token)."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


# -----------------------------------------------------------------------------
# batched forward passes after a shared prefix


def prefix_cache(model, prefix: list[int], max_len: int) -> KVCache:
    """A batch-1 cache holding the prefix's keys/values, with room up to max_len slots: computed once, then
    copied into every batch of questions that follows it."""
    p = next(model.parameters())
    cache = KVCache(model.config, 1, max_len, device=p.device, dtype=p.dtype)
    if prefix:
        model(torch.tensor([prefix], device=p.device), cache=cache)
    return cache


def run_left_padded(model, base: KVCache, rows: list[list[int]], room: int = 0):
    """Run rows of different lengths after the prefix in base: [prefix][pads][row], each row's positions
    continuing from the prefix. Returns logits (B, L, V) and the batch's cache (positioned after the rows, with
    `room` free slots left for generation)."""
    B, L, P = len(rows), max(len(r) for r in rows), base.len
    if P + L + room > base.valid.size(1):
        raise ValueError(f"the prefix cache has {base.valid.size(1)} slots; {P} prefix + {L} prompt + {room} new "
                         "tokens need more")
    idx = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    pos = torch.full((B, L), P, dtype=torch.long)  # pads' positions are never looked at
    for b, r in enumerate(rows):
        idx[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = True
        pos[b, L - len(r):] = torch.arange(P, P + len(r))
    dev = base.valid.device
    cache = base.repeat(B)
    logits = model(idx.to(dev), cache=cache, pos=pos.to(dev), mask=mask.to(dev))
    return logits, cache


@torch.no_grad()
def greedy_decode(model, tok, eos_id: int, base: KVCache, suffixes: list[list[int]], *, max_new_tokens: int,
                  batch_size: int, stop: str = STOP) -> tuple[list[list[int]], int]:
    """Greedy continuations of the prefix in base + each suffix, each ending at (and including) the token that
    produced EOS, the stop string, or max_new_tokens. Returns them in input order, and the tokens processed
    (prompts with their padding, generated tokens; not the prefix)."""
    tokens = 0
    gens = [[] for _ in suffixes]
    # similar lengths together waste little padding
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start in range(0, len(order), batch_size):
        live = order[start:start + batch_size]  # question of each cache row
        logits, cache = run_left_padded(model, base, [suffixes[i] for i in live], room=max_new_tokens)
        tokens += logits.size(0) * logits.size(1)
        pos = torch.tensor([base.len + len(suffixes[i]) for i in live], device=logits.device)
        while True:
            nxt = logits[:, -1].argmax(-1)  # (B,)
            keep = []
            for row, (i, t) in enumerate(zip(live, nxt.tolist())):
                gens[i].append(t)
                if t != eos_id and len(gens[i]) < max_new_tokens and stop not in tok.decode(gens[i]):
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(live):
                # drop finished rows from the batch so later steps only pay for live ones
                sel = torch.tensor(keep, device=logits.device)
                cache.k = [k[sel] for k in cache.k]
                cache.v = [v[sel] for v in cache.v]
                cache.valid = cache.valid[sel]
                live, nxt, pos = [live[r] for r in keep], nxt[sel], pos[sel]
            logits = model(nxt[:, None], cache=cache, pos=pos[:, None])
            pos = pos + 1
    return gens, tokens + sum(len(g) for g in gens)


@torch.no_grad()
def gold_loss(model, base: KVCache, suffixes: list[list[int]], targets: list[list[int]], *,
              batch_size: int) -> tuple[list[float], int]:
    """Summed cross-entropy of each target's tokens after the prefix in base + its suffix (teacher forced), and
    the tokens processed (suffix + target rows with their padding; not the prefix)."""
    lengths = [len(s) + len(t) for s, t in zip(suffixes, targets)]
    tokens = 0
    nll = [0.0] * len(suffixes)
    order = sorted(range(len(suffixes)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        logits, _ = run_left_padded(model, base, [suffixes[i] + targets[i] for i in batch])
        B, L, _ = logits.shape
        tokens += B * L
        for b, i in enumerate(batch):
            # rows are right-aligned: the target is the last n tokens, each predicted one position earlier
            n = len(targets[i])
            gold = torch.tensor(targets[i], device=logits.device)
            nll[i] = F.cross_entropy(logits[b, L - 1 - n:L - 1], gold, reduction="sum").item()
    return nll, tokens


# -----------------------------------------------------------------------------
# evaluation


def evaluate_task(model, tok, eos_id: int, examples, train, *, shots: int = 5, seed: int = 20,
                  batch_size: int = 32, max_new_tokens: int = 256, signal: str = "acc", rank: int = 0,
                  world: int = 1) -> dict:
    """One rank's share of one task (questions rank, rank+world, ...): counts to be summed over ranks.
    Returns {"correct", "n", "nll", "target_tokens", "tokens"}; "correct" stays 0 with signal "loss"."""
    keys, texts = few_shot_prompts(examples, train, shots, seed)
    groups = {}  # questions asked after the same shots share their prefix
    for q in range(rank, len(examples), world):
        groups.setdefault(keys[q], []).append(q)
    out = {"correct": 0, "n": 0, "nll": 0.0, "target_tokens": 0, "tokens": 0}
    for qs in groups.values():
        # tokenise whole prompts and share their common token prefix: exact whatever the tokenizer merges
        prompts = encode_prompts(tok, [texts[q] for q in qs])
        P = common_prefix_len(prompts)
        suffixes = [p[P:] for p in prompts]
        # the gold target as training encodes it: apart from the prompt, with EOS (data.encode_examples)
        targets = [e.ids + [eos_id] for e in tok.encode_batch([format_target(examples[q]) for q in qs],
                                                              add_special_tokens=False)]
        longest = max(len(s) + max(len(t), max_new_tokens if signal == "acc" else 0)
                      for s, t in zip(suffixes, targets))
        base = prefix_cache(model, prompts[0][:P], P + longest)
        nll, tokens = gold_loss(model, base, suffixes, targets, batch_size=batch_size)
        out["nll"] += sum(nll)
        out["target_tokens"] += sum(len(t) for t in targets)
        out["tokens"] += P + tokens
        out["n"] += len(qs)
        if signal == "acc":
            gens, tokens = greedy_decode(model, tok, eos_id, base, suffixes, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size)
            out["tokens"] += tokens
            for q, g in zip(qs, gens):
                out["correct"] += is_correct(extract_answer(tok.decode(g).split(STOP)[0]), examples[q].answer)
    return out


def evaluate(model, tok, eos_id, mixture, tasks, split="selection", *, shots=5, seed=20, limit=None,
             batch_size=32, max_new_tokens=256, signal="acc") -> dict[str, dict]:
    """Per task {"acc", "loss", "n", "tokens"} on mixture[task][split] (the first `limit` examples), 5-shot from
    mixture[task]["train"]. acc is None with signal "loss"; loss is the mean cross-entropy per gold target token
    (EOS included, as in training); tokens is what all ranks ran through the model, padding and generated tokens
    included (the D of 2·N·D). Split across ranks when torch.distributed is up."""
    if signal not in ("acc", "loss"):
        raise ValueError(f"signal must be 'acc' or 'loss', got {signal!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    if shots < 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need shots >= 0, batch_size >= 1, max_new_tokens >= 1; got {shots}, {batch_size}, "
                         f"{max_new_tokens}")
    for task in tasks:
        if task not in mixture:
            raise ValueError(f"unknown task {task!r}; the mixture has {', '.join(sorted(mixture))}")
        for s in (split, "train"):
            if not mixture[task].get(s):
                raise ValueError(f"task {task!r} has no {s!r} examples (splits: {', '.join(sorted(mixture[task]))})")
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks:
        examples = mixture[task][split][:limit]
        c = evaluate_task(model, tok, eos_id, examples, mixture[task]["train"], shots=shots, seed=seed,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, signal=signal, rank=rank,
                          world=world)
        counts = [c["correct"], c["n"], c["nll"], c["target_tokens"], c["tokens"]]
        if ddp:  # every rank reaches this for every task, whatever its share
            t = torch.tensor(counts, dtype=torch.float64, device=next(model.parameters()).device)
            dist.all_reduce(t)
            counts = t.tolist()
        correct, n, nll, target_tokens, tokens = counts
        results[task] = {"acc": correct / n if signal == "acc" else None, "loss": nll / target_tokens,
                         "n": int(n), "tokens": int(tokens)}
    model.train(was_training)
    return results


# -----------------------------------------------------------------------------
# command line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # what to evaluate
    ap.add_argument("--model", required=True, help="checkpoint folder in hub layout, or a hub id")
    ap.add_argument("--data", required=True, help="prepared mixture folder (python data.py prepare ...)")
    ap.add_argument("--tasks", nargs="+", default=None, help="tasks to evaluate (default: all in --data)")
    ap.add_argument("--split", choices=["selection", "test", "train"], default="selection",
                    help="split to evaluate (the official code reports test)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    # how
    ap.add_argument("--shots", type=int, default=5, help="worked examples before each question")
    ap.add_argument("--seed", type=int, default=20, help="picks the shots")
    ap.add_argument("--batch-size", type=int, default=32, help="questions decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="generation cap (gsm8k rationales need ~200)")
    ap.add_argument("--signal", choices=["acc", "loss"], default="acc", help="loss: gold-target loss only, no "
                    "generation (cheap)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and cache dtype")
    # output
    ap.add_argument("--out", default=None, help="write the per-task figures and the arguments here (JSON)")
    args = ap.parse_args()
    for flag, v, least in (("--limit", args.limit, 1), ("--shots", args.shots, 0),
                           ("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if v is not None and v < least:
            ap.error(f"{flag} must be >= {least}, got {v}")
    if not Path(args.data).is_dir():
        ap.error(f"--data {args.data}: not a folder (prepare one with: python data.py prepare ...)")

    try:  # unknown tasks and malformed files come back as errors that name them
        mixture = load_mixture(args.data, args.tasks)
    except ValueError as e:
        ap.error(f"--data {args.data}: {e}")
    tasks = args.tasks or sorted(mixture)
    folder = resolve_checkpoint(args.model)
    tok, eos_id = load_tokenizer(folder)
    model = Transformer.from_pretrained(folder, device=args.device, dtype=getattr(torch, args.dtype))

    print(f"{'task':<16}{'n':>6}{'acc':>8}{'loss':>8}{'tokens':>11}{'seconds':>9}")
    results = {}
    for task in tasks:
        t0 = time.time()
        r = evaluate(model, tok, eos_id, mixture, [task], args.split, shots=args.shots, seed=args.seed,
                     limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                     signal=args.signal)[task]
        r["seconds"] = round(time.time() - t0, 2)
        results[task] = r
        acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
        print(f"{task:<16}{r['n']:>6}{acc:>8}{r['loss']:>8.3f}{r['tokens']:>11}{r['seconds']:>9.1f}")
    if args.out:
        # written to a temporary name and renamed: a crash never leaves half a file
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
