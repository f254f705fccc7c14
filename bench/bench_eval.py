"""Speed of evaluate.py's few-shot greedy decoding against transformers' generate, on the same prompts.

    python bench/bench_eval.py                  # openbookqa test, 200 questions, 5-shot, SmolLM2-135M-Instruct, CPU
    python bench/bench_eval.py --task arc_easy --n 100 --threads 1
    python bench/bench_eval.py --device cuda --dtype bfloat16 --json obqa.json                 # on a GPU
    python bench/bench_eval.py --device cuda --dtype bfloat16 --task gsm8k --n 100 --max-new-tokens 512

The real 5-shot workload of one task: questions from DATA/<task>/test.jsonl (the hub's schema),
shots from its train.jsonl, prompts built and tokenized by evaluate.py. Ours: the shared 5-shot prefix computed once,
questions sorted by length, left-padded batches, finished rows dropped. transformers: model.generate, greedy, the
same token ids in the same sorted, left-padded batches with an attention mask, EOS and a stopping criterion that
ends a row once its first "####" line has ended (a batch runs until its last row stops). Each output is cut where
evaluate.py stops (its first EOS, or where that line ends); the script prints how many agree token for token, the
wall time and generated tokens per second of both, and the ratio.
--dtype sets both models' weights (and ours' KV cache). transformers is only the yardstick here
(requirements-dev.txt); the project itself never imports it. tests/test_gpu.py reuses load_prompts and run_ours.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project sits one folder up
import evaluate as ev  # noqa: E402
from data import encode_prompts, load_tokenizer, read_jsonl  # noqa: E402
from prepare import convert  # noqa: E402
from model import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# the evaluator's side: the only place in bench/ and tests/ that calls evaluate.py's functions (few_shot_prompts,
# common_prefix_len, prefix_cache, greedy_decode, extract_answer, is_correct, answer_complete, PROMPT_ENDS), so a
# change there is met here


def load_prompts(data, task: str, n: int, shots: int, tok):
    """(questions, shot set of each, prompt token ids of each) for the first n test rows of DATA/<task>."""
    rows = {s: [convert(task, r) for r in read_jsonl(Path(data) / task / f"{s}.jsonl")] for s in ("train", "test")}
    asked = rows["test"][:n]
    keys, texts = ev.few_shot_prompts(asked, rows["train"], shots, seed=20)
    return asked, keys, encode_prompts(tok, [t + ev.PROMPT_ENDS["release"] for t in texts])


def cut(gen, tok, eos):
    """A continuation where evaluate.py stops it: its first EOS, or the end of its first "####" line."""
    for k in range(len(gen)):
        if gen[k] == eos or ev.answer_complete(tok.decode(gen[:k + 1])):
            return gen[:k + 1]
    return gen


def run_ours(model, tok, eos, ids, keys, qs, *, max_new_tokens, batch_size):
    """Our greedy continuations of questions qs (indices into ids), and the tokens run through the model."""
    out, tokens = {}, 0
    groups = {}  # questions after the same shots share a prefix, as in evaluate_task
    for q in qs:
        groups.setdefault(keys[q], []).append(q)
    for group in groups.values():
        P = ev.common_prefix_len([ids[q] for q in group])
        base = ev.prefix_cache(model, ids[group[0]][:P], max(len(ids[q]) for q in group) + max_new_tokens)
        gens, t = ev.greedy_decode(model, tok, eos, base, [ids[q][P:] for q in group],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
        out.update(zip(group, gens))
        tokens += P + t
    return [out[q] for q in qs], tokens


def answer_line_ended(tok, L):
    """transformers' stopping criterion: per row, has the text after the first L tokens ended its "####" line?"""
    from transformers import StoppingCriteria

    class AnswerLineEnded(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [ev.answer_complete(tok.decode(row[L:])) for row in input_ids.tolist()]
            return torch.tensor(done, device=input_ids.device)
    return AnswerLineEnded()


@torch.no_grad()
def run_hf(model, tok, eos, ids, qs, *, max_new_tokens, batch_size):
    """transformers' greedy continuations of questions qs, cut as ours are, and the tokens run through the model."""
    out, tokens = {}, 0
    device = next(model.parameters()).device
    order = sorted(qs, key=lambda q: len(ids[q]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        L = max(len(ids[q]) for q in batch)
        idx = torch.full((len(batch), L), eos, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for b, q in enumerate(batch):
            idx[b, L - len(ids[q]):] = torch.tensor(ids[q])
            mask[b, L - len(ids[q]):] = 1
        gen = model.generate(input_ids=idx.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, stopping_criteria=[answer_line_ended(tok, L)], eos_token_id=eos,
                             pad_token_id=eos)[:, L:]
        tokens += len(batch) * (L + gen.size(1))  # every row runs until the batch's last one stops
        out.update((q, cut(g, tok, eos)) for q, g in zip(batch, gen.tolist()))
    return [out[q] for q in qs], tokens


def accuracy(gens, asked, tok) -> float:
    answers = [ev.extract_answer(tok.decode(g)) for g in gens]
    return sum(ev.is_correct(a, ex.answer) for a, ex in zip(answers, asked)) / len(asked)


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("MSFT_SMOLLM2"), required="MSFT_SMOLLM2" not in os.environ,
                        help="checkpoint folder in hub layout (default: $MSFT_SMOLLM2)")
    parser.add_argument("--data", default=os.environ.get("MSFT_SHARED_DATA"),
                        required="MSFT_SHARED_DATA" not in os.environ, help="DIR/<task>/{train,test}.jsonl, rows in the hub's schema (default: $MSFT_SHARED_DATA)")
    parser.add_argument("--task", default="openbookqa", help="a task with train and test rows in --data")
    parser.add_argument("--n", type=int, default=200, help="questions (the first n test rows)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="enough for '#### B.' and its line end")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights of both models (and ours' KV cache)")
    parser.add_argument("--json", help="also write the settings and the figures to this JSON file")
    args = parser.parse_args()
    if args.n < 1 or args.shots < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--n, --batch-size and --max-new-tokens must be >= 1, --shots >= 0")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible to torch")
    for split in ("train", "test"):
        if not (Path(args.data) / args.task / f"{split}.jsonl").is_file():
            parser.error(f"--data/--task: no {Path(args.data) / args.task / f'{split}.jsonl'}")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (expected a checkpoint folder in hub layout)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("this benchmark compares against transformers: pip install -r requirements-dev.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)

    tok, eos = load_tokenizer(args.model)
    asked, keys, ids = load_prompts(args.data, args.task, args.n, args.shots, tok)
    ours_model = Transformer.from_pretrained(args.model, device=args.device, dtype=dtype).eval()
    hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    hf_model.to(args.device).eval()
    how = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def timed(fn, qs):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gens, tokens = fn(qs)
        if cuda:
            torch.cuda.synchronize()
        return gens, tokens, time.perf_counter() - t0

    def ours_fn(qs):
        return run_ours(ours_model, tok, eos, ids, keys, qs, **how)

    def hf_fn(qs):
        return run_hf(hf_model, tok, eos, ids, qs, **how)

    qs = list(range(len(asked)))
    ours_fn(qs[:4]), hf_fn(qs[:4])  # warm up both (allocator, kernels) on a few questions
    ours, ours_tokens, t_ours = timed(ours_fn, qs)
    hf, hf_tokens, t_hf = timed(hf_fn, qs)

    same = sum(a == b for a, b in zip(ours, hf))
    acc = accuracy(ours, asked, tok)
    generated, generated_hf = sum(map(len, ours)), sum(map(len, hf))
    rate_ours, rate_hf = generated / t_ours, generated_hf / t_hf
    where = f"{args.dtype} on {args.device}" + (f" ({torch.cuda.get_device_name(args.device)})" if cuda else
                                                f", {torch.get_num_threads()} threads")
    print(f"{args.task}: {len(asked)} questions, {args.shots}-shot, batch {args.batch_size}, {where}, prompts "
          f"{min(map(len, ids))}-{max(map(len, ids))} tokens, {len(set(keys))} distinct shot sets, at most "
          f"{args.max_new_tokens} new tokens, accuracy {acc:.3f}")
    print(f"same greedy output (token for token, cut where evaluate.py stops): {same}/{len(asked)}")
    print("| what | ours | transformers | ratio |")
    print("|---|---|---|---|")
    print(f"| wall time (s) | {t_ours:.1f} | {t_hf:.1f} | {t_hf / t_ours:.2f}x |")
    print(f"| generated tokens/s | {rate_ours:.1f} | {rate_hf:.1f} | {rate_ours / rate_hf:.2f}x |")
    print(f"| tokens run through the model | {ours_tokens} | {hf_tokens} | {hf_tokens / ours_tokens:.2f}x |")
    if args.json:
        report = {"task": args.task, "n": len(asked), "shots": args.shots, "batch_size": args.batch_size,
                  "max_new_tokens": args.max_new_tokens, "device": args.device, "dtype": args.dtype,
                  "device_name": torch.cuda.get_device_name(args.device) if cuda else "cpu", "same_output": same,
                  "accuracy_ours": acc, "accuracy_transformers": accuracy(hf, asked, tok),
                  "wall_s_ours": t_ours, "wall_s_transformers": t_hf, "speedup": t_hf / t_ours,
                  "generated_tokens_ours": generated, "generated_tokens_transformers": generated_hf,
                  "generated_tokens_per_s_ours": rate_ours, "generated_tokens_per_s_transformers": rate_hf,
                  "tokens_through_model_ours": ours_tokens, "tokens_through_model_transformers": hf_tokens,
                  "torch": torch.__version__}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
