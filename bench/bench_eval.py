"""Speed of evaluate.py's few-shot greedy decoding against transformers' generate, on the same prompts.

    python bench/bench_eval.py                  # openbookqa test, 200 questions, 5-shot, SmolLM2-135M-Instruct, CPU
    python bench/bench_eval.py --task arc_easy --n 100 --threads 1

The real 5-shot workload of one task: questions from DATA/<task>/test.jsonl (hub schema, e.g. ../shared/data),
shots from its train.jsonl, prompts built and tokenized by evaluate.py. Ours: the shared 5-shot prefix computed once,
questions sorted by length, left-padded batches, finished rows dropped. transformers: model.generate, greedy, the
same token ids in the same sorted, left-padded batches with an attention mask, EOS and a stopping criterion that
ends a row once its first "####" line has ended (a batch runs until its last row stops). Each output is cut where
evaluate.py stops (its first EOS, or where that line ends); the script prints how many agree token for token, the
wall time and generated tokens per second of both, and the ratio.
transformers is only the yardstick here (requirements-dev.txt); the project itself never imports it.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project sits one folder up
import evaluate as ev  # noqa: E402
from data import convert, encode_prompts, load_tokenizer, read_jsonl  # noqa: E402
from model import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default=str(Path.home() / ".cache/msft-real/smollm2-135m-instruct"),
                    help="checkpoint folder in hub layout (default: ../shared/tools/get-smollm2.sh's folder)")
parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="DIR/<task>/{train,test}.jsonl")
parser.add_argument("--task", default="openbookqa", help="a task with train and test rows in --data")
parser.add_argument("--n", type=int, default=200, help="questions (the first n test rows)")
parser.add_argument("--shots", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--max-new-tokens", type=int, default=32, help="enough for '#### B.' and its line end")
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
args = parser.parse_args()
if args.n < 1 or args.shots < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
    parser.error("--n, --batch-size and --max-new-tokens must be >= 1, --shots >= 0")
for split in ("train", "test"):
    if not (Path(args.data) / args.task / f"{split}.jsonl").is_file():
        parser.error(f"--data/--task: no {Path(args.data) / args.task / f'{split}.jsonl'}")
try:
    from transformers import AutoModelForCausalLM, StoppingCriteria
except ImportError:
    sys.exit("this benchmark compares against transformers: pip install -r requirements-dev.txt")
if args.threads:
    torch.set_num_threads(args.threads)

rows = {s: [convert(args.task, r) for r in read_jsonl(Path(args.data) / args.task / f"{s}.jsonl")]
        for s in ("train", "test")}
asked = rows["test"][:args.n]
keys, texts = ev.few_shot_prompts(asked, rows["train"], args.shots, seed=20)
tok, eos = load_tokenizer(args.model)
ids = encode_prompts(tok, [t + ev.PROMPT_ENDS["release"] for t in texts])
ours_model = Transformer.from_pretrained(args.model).eval()
hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()


def cut(gen):
    """A continuation where evaluate.py stops it: its first EOS, or the end of its first "####" line."""
    for k in range(len(gen)):
        if gen[k] == eos or ev.answer_complete(tok.decode(gen[:k + 1])):
            return gen[:k + 1]
    return gen


class AnswerLineEnded(StoppingCriteria):
    """Per row: has the text generated after the first L tokens ended its first "####" line?"""

    def __init__(self, L):
        self.L = L

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([ev.answer_complete(tok.decode(row[self.L:])) for row in input_ids.tolist()])


def run_ours(qs):
    out, tokens = {}, 0
    groups = {}  # questions after the same shots share a prefix, as in evaluate_task
    for q in qs:
        groups.setdefault(keys[q], []).append(q)
    for group in groups.values():
        P = ev.common_prefix_len([ids[q] for q in group])
        base = ev.prefix_cache(ours_model, ids[group[0]][:P], max(len(ids[q]) for q in group) + args.max_new_tokens)
        gens, t = ev.greedy_decode(ours_model, tok, eos, base, [ids[q][P:] for q in group],
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        out.update(zip(group, gens))
        tokens += P + t
    return [out[q] for q in qs], tokens


@torch.no_grad()
def run_hf(qs):
    out, tokens = {}, 0
    order = sorted(qs, key=lambda q: len(ids[q]))
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        L = max(len(ids[q]) for q in batch)
        idx = torch.full((len(batch), L), eos, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for b, q in enumerate(batch):
            idx[b, L - len(ids[q]):] = torch.tensor(ids[q])
            mask[b, L - len(ids[q]):] = 1
        gen = hf_model.generate(input_ids=idx, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                do_sample=False, stopping_criteria=[AnswerLineEnded(L)], eos_token_id=eos,
                                pad_token_id=eos)[:, L:]
        tokens += len(batch) * (L + gen.size(1))  # every row runs until the batch's last one stops
        out.update((q, cut(g)) for q, g in zip(batch, gen.tolist()))
    return [out[q] for q in qs], tokens


qs = list(range(len(asked)))
run_ours(qs[:4]), run_hf(qs[:4])  # warm up both (allocator, kernels) on a few questions
t0 = time.perf_counter()
ours, ours_tokens = run_ours(qs)
t_ours = time.perf_counter() - t0
t0 = time.perf_counter()
hf, hf_tokens = run_hf(qs)
t_hf = time.perf_counter() - t0

same = sum(a == b for a, b in zip(ours, hf))
answers = [ev.extract_answer(tok.decode(g)) for g in ours]
acc = sum(ev.is_correct(a, ex.answer) for a, ex in zip(answers, asked)) / len(asked)
generated = sum(map(len, ours))
print(f"{args.task}: {len(asked)} questions, {args.shots}-shot, batch {args.batch_size}, "
      f"{torch.get_num_threads()} threads, prompts {min(map(len, ids))}-{max(map(len, ids))} tokens, "
      f"{len(set(keys))} distinct shot sets, accuracy {acc:.3f}")
print(f"same greedy output (token for token, cut where evaluate.py stops): {same}/{len(asked)}")
print("| what | ours | transformers | ratio |")
print("|---|---|---|---|")
print(f"| wall time (s) | {t_ours:.1f} | {t_hf:.1f} | {t_hf / t_ours:.2f}x |")
rate_ours, rate_hf = generated / t_ours, sum(map(len, hf)) / t_hf
print(f"| generated tokens/s | {rate_ours:.1f} | {rate_hf:.1f} | {rate_ours / rate_hf:.2f}x |")
print(f"| tokens run through the model | {ours_tokens} | {hf_tokens} | {hf_tokens / ours_tokens:.2f}x |")
