"""The built-in demo: a synthetic mixture whose tasks a tiny random model learns, and overfits, at different speeds,
then SFT and mSFT on it one after the other, their curves, exclusions and final table. No download, about a minute.

    python train.py                      # what `python train.py` with no --model and --data runs
    python train.py --method msft        # one method on the demo

The mixture (make_demo) is a mixture folder like any other (runs/demo/data), with its own byte-level BPE tokenizer,
and the model (demo_checkpoint) a hub-layout checkpoint (runs/demo/data/model); DEMO_ARGS are the flags the demo
sets where the command line leaves the default.
"""
import argparse
import json
import os
import platform
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import common
import data
import hub
import runfolder
import train
from common import print0
from data import LETTERS, format_prompt, format_target, from_plain
from model import ModelConfig, Transformer

EOS = "<|endoftext|>"
DEMO_VOCAB = 320

# the tiny decoder the demo trains (model.ModelConfig kwargs); vocab_size is the demo tokenizer's
DEMO_MODEL = dict(model_type="llama", vocab_size=DEMO_VOCAB, dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                  head_dim=24, hidden_dim=256, max_seq_len=512, tie_embeddings=True)
# train.py's flags for the demo, where the command line leaves the default. shots=0: the tiny model only ever sees
# one question per sequence, and few-shot examples would come from training rows whose tagged labels are shifted.
# ies_threshold: a 0.3M-parameter model's losses flatten less than a pretrained LLM's (at 1e-3, 2% of the demo's
# example-epochs are left out; at 1e-2, 13%, from the 3rd epoch on)
DEMO_ARGS = dict(lr=5e-4, batch_size=16, micro_batch=16, interval=0.25, max_len=64, shots=0, max_new_tokens=8,
                 signal="loss", ies_threshold=1e-2)


# -----------------------------------------------------------------------------
# the rules: each returns (question, choices, index of the correct choice). The choices are fixed per task and
# the answer is read off the question, so a 2-layer model can learn every rule within a few hundred steps.

SYMBOLS = ["a", "b", "c", "d"]
RESIDUES = ["0", "1", "2", "3"]


def _first(rng):
    # easiest: copy the first of five symbols
    s = rng.choices(SYMBOLS, k=5)
    return "first " + " ".join(s), SYMBOLS, SYMBOLS.index(s[0])


def _sum(rng):
    # a combination of two tokens: (x + y) mod 4, with three filler symbols so rows differ
    x, y = rng.randrange(10), rng.randrange(10)
    return f"sum {x} {y} " + "".join(rng.choices("efghijk", k=3)), RESIDUES, (x + y) % 4


def _lookup(word, keys):
    # an arbitrary key -> letter table (fixed by the key list, not by the seed): more keys take longer to learn
    table = {k: random.Random(k).randrange(4) for k in keys}

    def rule(rng):
        k = rng.choice(keys)
        # three filler letters so rows differ and selection/test questions are new
        return f"{word} {k} " + "".join(rng.choices("efghij", k=3)), SYMBOLS, table[k]
    return rule


_key = _lookup("key", [a + b for a in "lmno" for b in "pqrs"])  # 16 keys
_code = _lookup("code", [a + b for a in "tuvwxy" for b in "pqrs"])  # 24 keys


# task -> (rule, training rows, quirk). A fraction `quirk` of each task's rows end with the task's own tag, and in
# the training split only, a tagged row's answer is shifted to the next letter: a consistent error, so the model
# learns it after the rule and from then on gets the tagged selection rows wrong (accuracy falls to about 1 - quirk).
# When a rule is learnt is set by its difficulty and its share of the mixture. Measured (SFT, DEMO_TRAIN, seeds 0/1):
# first peaks at ~2 epochs then falls to ~0.72; key (clean) saturates at ~5-8; code (quirk) plateaus ~0.85 from ~6-9;
# sum (clean) is still rising until ~9.
DEMO_TASKS = {
    "first": (_first, 800, 0.25),
    "key": (_key, 300, 0.0),
    "code": (_code, 300, 0.2),
    "sum": (_sum, 300, 0.0),
}
N_SELECTION, N_TEST = 64, 64
TAGS = "xyzw"  # one tag per task, so each quirk is learnt on its own schedule


def _rows(rule, n, quirk, tag, train, rng, seen):
    rows = []
    while len(rows) < n:
        question, choices, k = rule(rng)
        tagged = rng.random() < quirk
        question += f" {tag}" if tagged else ""
        if question in seen:  # no question repeats within a task, so selection and test never leak from train
            continue
        seen.add(question)
        if tagged and train:
            k = (k + 1) % 4
        rows.append({"question": question, "answer": LETTERS[k], "choices": choices, "rationale": None})
    return rows


def make_demo(out: Path, seed: int = 0) -> Path:
    """Write the demo mixture folder (the layout data.load_mixture reads) with its tokenizer in OUT/tokenizer."""
    out = Path(out)
    manifest = {"source": "demo", "seed": seed, "asked": {"train": None, "selection": N_SELECTION, "test": N_TEST},
                "tasks": {}}
    texts = []
    for tag, (task, (rule, n_train, quirk)) in zip(TAGS, DEMO_TASKS.items()):
        rng, seen = random.Random(f"{seed}:{task}"), set()
        # held-out rows first and clean; then the training rows, the tagged ones with shifted labels
        parts = {"selection": _rows(rule, N_SELECTION, quirk, tag, False, rng, seen),
                 "test": _rows(rule, N_TEST, quirk, tag, False, rng, seen),
                 "train": _rows(rule, n_train, quirk, tag, True, rng, seen)}
        (out / task).mkdir(parents=True, exist_ok=True)
        for split, rows in parts.items():
            common.write_text(out / task / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            texts += [format_prompt(ex) + format_target(ex) for ex in map(from_plain, rows)]  # for the tokenizer
        manifest["tasks"][task] = {"schema": "plain", "quirk": quirk, "quirk_tag": tag,
                                   "sizes": {s: len(parts[s]) for s in ("train", "selection", "test")}}

    # byte-level BPE: every string round-trips exactly through encode/decode, and the vocab stays tiny
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != DEMO_VOCAB:
        raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size()} tokens, DEMO_MODEL expects {DEMO_VOCAB}")
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    common.write_text(out / "tokenizer" / "tokenizer.json", tok.to_str())
    common.write_text(out / "tokenizer" / "tokenizer_config.json", json.dumps({"eos_token": EOS}) + "\n")
    # written last: a folder with a manifest is a finished one
    common.write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return out


# -----------------------------------------------------------------------------
# the demo run

def demo_checkpoint(data_dir: Path) -> Path:
    """The demo's tiny model, seeded random weights, saved as a hub-layout checkpoint with the demo tokenizer."""
    folder = data_dir / "model"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        tok, _ = data.load_tokenizer(data_dir / "tokenizer")
        model = Transformer(ModelConfig(**{**DEMO_MODEL, "vocab_size": tok.get_vocab_size()}))
        hub.save_pretrained(model, folder, copy=sorted((data_dir / "tokenizer").glob("tokenizer*")))
    return folder


def pin_arithmetic():
    """The demo trains at lr 5e-4, which makes the last bits of its float sums matter: on another x86 CPU torch and
    MKL would take their AVX-512 code and round otherwise (measured here: SFT's best epoch 9.50 becomes 6.00 with
    torch's plain kernels, 7.50 with MKL's compatible ones). Pinned to their AVX2 code, one thread, before the first
    computation (both read these then), every x86 machine with AVX2 prints the same run."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        for k, v in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
            os.environ.setdefault(k, v)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the processes it starts (compare.py's train.py runs)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (several spin against each other)


def curve_table(evals: list[dict]) -> str:
    """SFT's selection scores at every whole epoch and at each task's peak (the first of its best), starred."""
    tasks = sorted(evals[0]["scores"])
    peak = {t: max(evals, key=lambda e: e["scores"][t])["epoch"] for t in tasks}
    lines = ["SFT selection scores by epoch (* = the task's peak):",
             "epoch  " + " ".join(f"{t[:10]:>10}" for t in tasks) + "        avg"]
    for e in evals:  # whole epochs, and every task's peak wherever it falls
        if float(e["epoch"]).is_integer() or e is evals[-1] or e["epoch"] in peak.values():
            cells = [f"{e['scores'][t]:9.3f}{'*' if peak[t] == e['epoch'] else ' '}" for t in tasks]
            lines.append(f"{e['epoch']:5.2f}  " + " ".join(cells) + f" {e['avg']:10.3f}")
    return "\n".join(lines + ["peak epoch per task: " + ", ".join(f"{t} {peak[t]:.2f}" for t in tasks)])


def main(args, argv: list[str]):
    """The built-in demo: a tiny random model on a synthetic mixture whose tasks learn and overfit at different
    speeds; SFT and mSFT one after the other (or --method's), then their curves, exclusions and final table."""
    root = Path(args.out or "runs/demo")
    if args.resume and not (root / "data" / "manifest.json").is_file():
        raise SystemExit(f"--resume: {root} holds neither a run (args.json) nor the demo: nothing to resume")
    pin_arithmetic()
    common.setup(args.device)
    data_dir = root / "data"
    if common.rank() == 0:  # one writer; the other ranks wait for the files
        make_demo(data_dir)
        demo_checkpoint(data_dir)
    common.barrier()
    given = common.given(train.build_parser(), argv)
    for k, v in {**DEMO_ARGS, "progress": 0}.items():  # the demo's own settings, where the command line gave none
        if k not in given:
            setattr(args, k, v)
    results = {}
    for method in [args.method] if args.method else ["sft", "msft"]:
        a = argparse.Namespace(**vars(args))
        a.method, a.out = method, str(root / method)
        if a.resume and (root / method / "summary.json").is_file():  # finished before the kill: its report
            results[method] = [e for e in data.read_jsonl(root / method / "log.jsonl") if e["event"] == "final"][-1]
            continue
        if not a.resume and common.rank() == 0:  # the demo starts afresh, but never under a live run
            runfolder.lock(Path(a.out))
            runfolder.clear(Path(a.out))
        common.barrier()
        results[method] = train.train(a, data_dir / "model", data_dir)
    if "sft" in results:  # the heterogeneous overfitting mSFT is for: every task peaks at its own epoch
        print0("\n" + curve_table([e for e in data.read_jsonl(root / "sft" / "log.jsonl") if e["event"] == "eval"]))
    if "msft" in results:
        for e in data.read_jsonl(root / "msft" / "log.jsonl"):
            if e["event"] == "decision" and e["kind"] == "drop":
                print0(f"mSFT stage {e['stage']}: excluded {', '.join(e['excluded'])}, rolled back to epoch "
                       f"{e['rollback_epoch']:.2f}")
    print0("\n| method | chosen epoch | selection avg | test avg | FLOPs |\n|---|---|---|---|---|")
    for m, r in results.items():
        print0(f"| {m} | {r['best_epoch']:.2f} | {r['best_avg']:.4f} | {r['test_avg']:.4f} | "
               f"{r['flops']['total']:.3e} |")
    common.cleanup()
    return results
