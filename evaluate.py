"""Few-shot greedy evaluation as the authors' release does it (docs/protocol.md): per-task accuracy, batched, with a
shared-prefix KV cache; optionally the gold-target loss.

    python data.py prepare --source hub --out mix                   # once: a mixture folder
    python evaluate.py --model CHECKPOINT --data mix --split test --limit 100 --out runs/eval-base  # evaluate_cli.py
    results = evaluate.evaluate(model, tok, eos_id, mixture, ["gsm8k"], "test", shots=5)          # as train.py does

Every question of a task is asked after the same 5 demonstrations, each "Q: {question}\\nA: #### B.\\n" (a worked
answer, as trained, for rationale tasks), joined with no blank line, then "Q: {question}\\nA: " with the release's
trailing space. Ours are drawn once from the task's training split by --seed (a question that is itself one of them
gets others); --demos FILE gives the release's hand-picked ones instead. Training wrote "A: #### B", which a BPE
tokenizer splits as "A:" + " ####": the release's prompt asks for a first token ("####" after " ") that training
never produced. --prompt-end consistent ends the prompt at "A:", so the first token asked for is the trained one.

The keys/values of the shared demonstrations are computed once and copied into every batch; only each question's
own tokens are run, left-padded, then decoded greedily until EOS or --max-new-tokens (512). Only the first "####"
line is read, so a row stops once that line has ended: its answer is then the one running to the cap would give.
The answer: the text after the first "####" up to the end of its line, stripped, trailing periods removed (the whole
output stripped when there is no "####"); compared as floats when both parse, else as lowercased strings.
The loss (--signal loss, or --gold-loss besides accuracy) is the mean token cross-entropy of the gold training
target after the question's training prompt ("...A:"): one teacher-forced forward, no generation.
Under torchrun, rank r takes every W-th question and the counts are summed, so any W gives the same numbers.
"""
import json
import math
import random
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from data import encode_prompts, format_prompt, format_target
from model import KVCache

MARK = "####"  # the answer follows it
PROMPT_ENDS = {"release": " ", "consistent": ""}  # what follows the asked question's "A:"

# -----------------------------------------------------------------------------
# answers


def extract_answer(text: str) -> str:
    """The release's reading: the text after the first "####" up to the end of its line, stripped, trailing periods
    removed; with no "####", the whole text stripped."""
    if MARK not in text:
        return text.strip()
    return text.split(MARK, 1)[1].split("\n", 1)[0].strip().rstrip(".")


def is_correct(pred: str, gold: str) -> bool:
    """As numbers when both parse as Python floats ("18." is 18; "1,000" and "$5" do not parse), else as lowercased
    strings."""
    try:
        return float(pred) == float(gold)
    except ValueError:
        return pred.lower() == gold.lower()


def answer_complete(text: str) -> bool:
    """Whether the first "####" line has ended: nothing written after it can change extract_answer(text)."""
    return MARK in text and "\n" in text.split(MARK, 1)[1]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of k successes in n trials (unlike p +- z·se, sound at 0 and n)."""
    p, zz = k / n, z * z / n
    mid = (p + zz / 2) / (1 + zz)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n)) / (1 + zz)
    return max(0.0, mid - half), min(1.0, mid + half)


# -----------------------------------------------------------------------------
# prompts


def few_shot_prompts(examples, train, shots: int, seed: int, demos=None) -> tuple[list[tuple[int, ...]], list[str]]:
    """For each example: the indices of its demonstrations in train, and its prompt up to the asked question's "A:"
    (the training prompt; generation appends PROMPT_ENDS). The demonstrations are the first `shots` of one seeded
    shuffle of train, skipping any whose question is the one asked (by content, not index), so all questions but
    those few share one prefix. demos [(question, answer)]: shown as given before every question instead (key ())."""
    if demos is not None:
        prefix = "".join(f"Q: {q}\nA: {a}\n" for q, a in demos)
        return [()] * len(examples), [prefix + format_prompt(ex) for ex in examples]
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
        # the release's demonstrations: "Q: ...\nA: #### B.\n", a period after a plain answer, a worked answer as
        # trained; no blank line between them
        shown = [format_prompt(train[i]) + format_target(train[i]) + ("." if train[i].rationale is None else "")
                 for i in picked]
        keys.append(tuple(picked))
        texts.append("".join(s + "\n" for s in shown) + format_prompt(ex))
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
        model(torch.tensor([prefix], device=p.device), cache=cache, hidden=True)  # no position's logits are read
    return cache


def run_left_padded(model, base: KVCache, rows: list[list[int]], room: int = 0):
    """Run rows of different lengths after the prefix in base: [prefix][pads][row], each row's positions
    continuing from the prefix. Returns the final hidden states (B, L, dim), for the caller to take the logits of
    the positions it reads, and the batch's cache (positioned after the rows, with `room` free slots left)."""
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
    h = model(idx.to(dev), cache=cache, pos=pos.to(dev), mask=mask.to(dev), hidden=True)
    return h, cache


@torch.no_grad()
def greedy_decode(model, tok, eos_id: int, base: KVCache, suffixes: list[list[int]], *, max_new_tokens: int,
                  batch_size: int, early_stop: bool = True, on_step=None) -> tuple[list[list[int]], int]:
    """Greedy continuations of the prefix in base + each suffix, each ending at (and including) EOS, the
    max_new_tokens-th token or, with early_stop, the token that ends the first "####" line. Returns them in input
    order, and the tokens processed (prompts with their padding, generated tokens; not the prefix).
    on_step(finished, generated) is called after every decoding step with the rows it finished and its tokens."""
    tokens = 0
    gens = [[] for _ in suffixes]
    # similar lengths together waste little padding
    order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
    for start in range(0, len(order), batch_size):
        live = order[start:start + batch_size]  # question of each cache row
        h, cache = run_left_padded(model, base, [suffixes[i] for i in live], room=max_new_tokens)
        tokens += h.size(0) * h.size(1)
        pos = torch.tensor([base.len + len(suffixes[i]) for i in live], device=h.device)
        while True:
            nxt = model.lm_head(h[:, -1]).argmax(-1)  # (B,): the last position's logits are the only ones read
            keep = []
            for row, (i, t) in enumerate(zip(live, nxt.tolist())):
                gens[i].append(t)
                # a line ends only with a token that writes "\n", so the whole text is decoded once per line, not
                # once per token (decoding it every step made long rows quadratic)
                done = (t == eos_id or len(gens[i]) == max_new_tokens
                        or early_stop and "\n" in tok.decode([t]) and answer_complete(tok.decode(gens[i])))
                if not done:
                    keep.append(row)
            if on_step:
                on_step(len(live) - len(keep), len(live))
            if not keep:
                break
            if len(keep) < len(live):
                # drop finished rows from the batch so later steps only pay for live ones
                sel = torch.tensor(keep, device=h.device)
                for layer in range(len(cache.k)):  # a layer at a time: never two copies of the whole cache
                    cache.k[layer], cache.v[layer] = cache.k[layer][sel], cache.v[layer][sel]
                cache.valid = cache.valid[sel]
                live, nxt, pos = [live[r] for r in keep], nxt[sel], pos[sel]
            h = model(nxt[:, None], cache=cache, pos=pos[:, None], hidden=True)
            pos = pos + 1
    return gens, tokens + sum(len(g) for g in gens)


@torch.no_grad()
def gold_nll(model, base: KVCache, suffixes: list[list[int]], targets: list[list[int]], *,
             batch_size: int) -> tuple[list[float], int]:
    """Summed cross-entropy of each target's tokens after the prefix in base + its suffix (teacher forced), and
    the tokens processed (suffix + target rows with their padding; not the prefix)."""
    lengths = [len(s) + len(t) for s, t in zip(suffixes, targets)]
    tokens = 0
    nll = [0.0] * len(suffixes)
    order = sorted(range(len(suffixes)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        h, _ = run_left_padded(model, base, [suffixes[i] + targets[i] for i in batch])
        B, L, _ = h.shape
        tokens += B * L
        for b, i in enumerate(batch):
            # rows are right-aligned: the target is the last n tokens, each predicted one position earlier; only
            # those positions' logits, one row at a time
            n = len(targets[i])
            logits = model.lm_head(h[b, L - 1 - n:L - 1]).float()  # (n, vocab)
            nll[i] = F.cross_entropy(logits, torch.tensor(targets[i], device=h.device), reduction="sum").item()
    return nll, tokens


# -----------------------------------------------------------------------------
# evaluation


def evaluate_task(model, tok, eos_id: int, examples, train, *, shots: int = 5, seed: int = 20, demos=None,
                  prompt_end: str = "release", batch_size: int = 32, max_new_tokens: int = 512,
                  signal: str = "acc", gold_loss: bool = False, rank: int = 0, world: int = 1,
                  on_step=None) -> dict:
    """One rank's share of one task (questions rank, rank+world, ...): {"n", "nll", "target_tokens", "tokens",
    "paper_tokens"}, counts to be summed over ranks, and "records", one per question generated (signal "acc")."""
    keys, texts = few_shot_prompts(examples, train, shots, seed, demos)
    loss = signal == "loss" or gold_loss
    groups = {}  # questions asked after the same demonstrations share their prefix
    for q in range(rank, len(examples), world):
        groups.setdefault(keys[q], []).append(q)
    out = {"n": 0, "nll": 0.0, "target_tokens": 0, "tokens": 0, "paper_tokens": 0, "records": []}
    for qs in groups.values():
        # tokenise whole prompts and share their common token prefix: exact whatever the tokenizer merges
        asked = encode_prompts(tok, [texts[q] + PROMPT_ENDS[prompt_end] for q in qs]) if signal == "acc" else []
        trained = encode_prompts(tok, [texts[q] for q in qs]) if loss else []
        # the gold target as training encodes it: apart from its prompt, with EOS (data.encode_examples)
        targets = [e.ids + [eos_id] for e in tok.encode_batch([format_target(examples[q]) for q in qs],
                                                              add_special_tokens=False)] if loss else []
        P = common_prefix_len(asked + trained)
        longest = max([len(p) + max_new_tokens for p in asked] + [len(p) + len(t) for p, t in zip(trained, targets)])
        base = prefix_cache(model, (asked or trained)[0][:P], longest)
        out["n"] += len(qs)
        out["tokens"] += P  # once for the group
        if loss:
            nll, tokens = gold_nll(model, base, [p[P:] for p in trained], targets, batch_size=batch_size)
            out["nll"] += sum(nll)
            out["target_tokens"] += sum(len(t) for t in targets)
            out["tokens"] += tokens
            # Appendix F counts every row whole: prefix included, no padding
            out["paper_tokens"] += sum(len(p) + len(t) for p, t in zip(trained, targets))
        if signal == "acc":
            gens, tokens = greedy_decode(model, tok, eos_id, base, [p[P:] for p in asked],
                                         max_new_tokens=max_new_tokens, batch_size=batch_size, on_step=on_step)
            out["tokens"] += tokens
            out["paper_tokens"] += sum(len(p) + len(g) for p, g in zip(asked, gens))
            for q, g in zip(qs, gens):
                text = tok.decode(g)
                pred, gold = extract_answer(text), examples[q].answer
                out["records"].append({"index": q, "shots": list(keys[q]), "generated": text, "answer": pred,
                                       "parsed": MARK in text, "gold": gold, "correct": is_correct(pred, gold)})
    return out


def evaluate(model, tok, eos_id, mixture, tasks, split="selection", *, shots=5, seed=20, demos=None,
             prompt_end="release", limit=None, batch_size=32, max_new_tokens=512, signal="acc", gold_loss=False,
             predictions=False, progress=None) -> dict[str, dict]:
    """Per task, on mixture[task][split] (its first `limit` examples), after `shots` demonstrations from
    mixture[task]["train"] or demos[task] ([(question, answer)], as written):
      acc, acc_ci (the 95% Wilson interval), unparsed (outputs with no "####"), top_answer and top_share (the most
      frequent answer and its share: a model that always says "B" shows); None with signal "loss";
      loss: the mean cross-entropy per gold target token (EOS included, as in training); None unless signal is
      "loss" or gold_loss;
      n; tokens: what all ranks ran through the model (each group's shared prefix once, padded rows, generated
      tokens); paper_tokens: Appendix F's D, every prompt whole (prefix included, no padding) with its generated
      tokens, and every gold-loss row whole;
      predictions (predictions=True): per question by index, its task, shots, generated text, answer, gold, correct.
    progress: seconds between lines on stderr within a task (rank 0's share), None for none.
    Split across ranks when torch.distributed is up."""
    if signal not in ("acc", "loss"):
        raise ValueError(f"signal must be 'acc' or 'loss', got {signal!r}")
    if prompt_end not in PROMPT_ENDS:
        raise ValueError(f"prompt_end must be one of {', '.join(PROMPT_ENDS)}, got {prompt_end!r}")
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
        if demos is not None and not demos.get(task):
            raise ValueError(f"demos has no demonstrations for task {task!r}")
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks:
        examples = mixture[task][split][:limit]
        done, generated, shown, t0 = 0, 0, time.time(), time.time()

        def on_step(finished, tokens):  # a progress line every `progress` seconds, even inside one long batch
            nonlocal done, generated, shown
            done, generated = done + finished, generated + tokens
            if time.time() - shown >= progress:
                shown = time.time()
                print(f"  {task}: {done}/{len(range(rank, len(examples), world))} questions answered, {generated} "
                      f"tokens generated, {shown - t0:.0f} s", file=sys.stderr, flush=True)
        c = evaluate_task(model, tok, eos_id, examples, mixture[task]["train"], shots=shots, seed=seed,
                          demos=None if demos is None else demos[task], prompt_end=prompt_end,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, signal=signal, gold_loss=gold_loss,
                          rank=rank, world=world, on_step=on_step if progress and rank == 0 else None)
        parts = [c]
        if ddp:  # every rank reaches this for every task, whatever its share
            parts = [None] * world
            dist.all_gather_object(parts, c)
        total = {k: sum(p[k] for p in parts) for k in ("n", "nll", "target_tokens", "tokens", "paper_tokens")}
        records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
        n = total["n"]
        r = {"acc": None, "acc_ci": None, "unparsed": None, "top_answer": None, "top_share": None,
             "loss": total["nll"] / total["target_tokens"] if signal == "loss" or gold_loss else None,
             "n": n, "tokens": total["tokens"], "paper_tokens": total["paper_tokens"]}
        if signal == "acc":
            correct = sum(rec["correct"] for rec in records)
            top, count = Counter(rec["answer"] for rec in records).most_common(1)[0]  # ties: the lowest index's
            r.update(acc=correct / n, acc_ci=wilson(correct, n), unparsed=sum(not rec["parsed"] for rec in records),
                     top_answer=top, top_share=count / n)
        if predictions:
            r["predictions"] = [{"task": task, **rec} for rec in records]
        results[task] = r
    model.train(was_training)
    return results


# -----------------------------------------------------------------------------
# command line


def load_demos(path, tasks) -> dict[str, list[tuple[str, str]]]:
    """--demos FILE: JSON {task: [{"question": ..., "answer": ...}, ...]}, each entry shown as
    "Q: {question}\\nA: {answer}\\n"; every task in `tasks` needs at least one. Errors name the file and the entry."""
    try:
        d = common.read_json(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    demos = {}
    for task in tasks:
        entries = d.get(task)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: no list of demonstrations for task {task!r} (it has {', '.join(d) or 'none'})")
        for i, e in enumerate(entries):
            if not (isinstance(e, dict) and set(e) == {"question", "answer"}
                    and all(isinstance(v, str) and v.strip() for v in e.values())):
                raise ValueError(f"{path}: {task}[{i}]: expected {{\"question\": text, \"answer\": text}}, "
                                 f"got {json.dumps(e)[:80]}")
        demos[task] = [(e["question"], e["answer"]) for e in entries]
    return demos


if __name__ == "__main__":  # python evaluate.py ...: the command's flags, table and files are in evaluate_cli.py
    import evaluate_cli
    common.run(evaluate_cli.main)
