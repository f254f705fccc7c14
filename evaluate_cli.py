"""`python evaluate.py`: score a checkpoint few-shot on a mixture folder, print a table, write what it found.

    python evaluate.py --model runs/msft/model --data mix --split test --out runs/msft/eval-test

The evaluator itself (prompts, batched greedy decoding after a shared prefix, the answer rule) is evaluate.py; this is
its command: flags checked at the door, a line per task as it finishes, and with --out DIR the files
DIR/results.json (the arguments and the per-task table) and DIR/predictions.jsonl (a line a question), rewritten after
every task so a long run that stops keeps what it finished.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

import common
import evaluate
import runfolder
from data import check_vocabulary, load_mixture, load_tokenizer
from hub import resolve_checkpoint
from model import Transformer


def main(argv=None):
    ap = argparse.ArgumentParser(description=evaluate.__doc__, formatter_class=common.HelpFormatter)
    # what to evaluate
    ap.add_argument("--model", required=True, help="checkpoint folder in hub layout, or a hub id")
    ap.add_argument("--data", required=True, help="prepared mixture folder (python data.py prepare ...)")
    ap.add_argument("--tasks", nargs="+", default=None, help="tasks to evaluate (default: all in --data)")
    ap.add_argument("--split", choices=["selection", "test", "train"], default="selection",
                    help="split to evaluate (the official code reports test)")
    ap.add_argument("--limit", type=common.number(int, at_least=1), default=None,
                    help="evaluate only the first N examples of each task (default: all)")
    # the prompt
    ap.add_argument("--shots", type=common.number(int, at_least=0), default=5,
                    help="demonstrations before each question, from the training split")
    ap.add_argument("--seed", type=common.number(int, at_least=0), default=20, help="picks the demonstrations")
    ap.add_argument("--demos", default=None, help="JSON file {task: [{\"question\": ..., \"answer\": ...}, ...]}: "
                    "these demonstrations, as written, before every question instead of --shots drawn ones")
    ap.add_argument("--prompt-end", choices=list(evaluate.PROMPT_ENDS), default="release",
                    help="release: the question ends 'A: ' as in the authors' code; consistent: 'A:', so the first "
                    "token asked for is the trained ' ####'")
    # how
    ap.add_argument("--batch-size", type=common.number(int, at_least=1), default=32, help="questions decoded together")
    ap.add_argument("--max-new-tokens", type=common.number(int, at_least=1), default=512,
                    help="generation cap (the release's 512)")
    ap.add_argument("--signal", choices=["acc", "loss"], default="acc", help="loss: gold-target loss only, no "
                    "generation (cheap)")
    ap.add_argument("--gold-loss", action="store_true", help="with --signal acc, the gold-target loss as well")
    ap.add_argument("--device", type=common.device, default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and cache dtype")
    # output
    ap.add_argument("--progress", type=common.number(float, above=0), default=60,
                    help="seconds between progress lines (stderr) in a task")
    ap.add_argument("--out", default=None, help="folder for results.json (arguments, per-task figures) and "
                    "predictions.jsonl (a line a question)")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        ap.error(f"--data {args.data}: not a folder (prepare one with: python data.py prepare ...)")
    if args.out:  # before anything slow: a run must not end unable to write what it found
        out = Path(args.out)
        try:
            runfolder.lock(out)  # one writer: not a folder another command holds, nor one inside a live run's
            common.write_text(out / ".probe", "")
            (out / ".probe").unlink()
        except OSError as e:
            ap.error(f"--out {args.out}: not a writable folder ({e.strerror or e})")

    try:  # unknown tasks and malformed files come back as errors that name them
        mixture = load_mixture(args.data, args.tasks)
    except ValueError as e:
        ap.error(f"--data {args.data}: {e}")
    tasks = args.tasks or sorted(mixture)
    demos = None
    if args.demos:
        try:
            demos = evaluate.load_demos(args.demos, tasks)
        except ValueError as e:
            ap.error(f"--demos {e}")
    folder = resolve_checkpoint(args.model)
    tok, eos_id = load_tokenizer(folder)
    model = Transformer.from_pretrained(folder, device=args.device, dtype=getattr(torch, args.dtype))
    check_vocabulary(tok, model.config.vocab_size, folder)

    print(f"{'task':<16}{'n':>6}{'acc':>7}{'95% CI':>15}{'unparsed':>10}  {'top answer (share)':<24}{'loss':>7}"
          f"{'tokens':>11}{'paper tok':>11}{'seconds':>9}")
    results, preds = {}, []
    for task in tasks:
        t0 = time.time()
        r = evaluate.evaluate(model, tok, eos_id, mixture, [task], args.split, shots=args.shots, seed=args.seed,
                              demos=demos, prompt_end=args.prompt_end, limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, signal=args.signal, gold_loss=args.gold_loss,
                              predictions=args.out is not None, progress=args.progress)[task]
        r["seconds"] = round(time.time() - t0, 2)
        if r["loss"] is not None and not math.isfinite(r["loss"]):  # not a number to put in the table
            raise ValueError(f"{task}: the gold-target loss is {r['loss']}: {args.model} gives non-finite logits "
                             "(a broken checkpoint?)")
        preds += r.pop("predictions", [])
        results[task] = r
        acc, ci, unparsed, top = "-", "-", "-", "-"
        if r["acc"] is not None:
            acc, ci, unparsed = f"{r['acc']:.3f}", f"[{r['acc_ci'][0]:.3f}, {r['acc_ci'][1]:.3f}]", r["unparsed"]
            top = f"{json.dumps(r['top_answer'])[:16]} ({r['top_share']:.2f})"
        loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
        print(f"{task:<16}{r['n']:>6}{acc:>7}{ci:>15}{unparsed:>10}  {top:<24}{loss:>7}{r['tokens']:>11}"
              f"{r['paper_tokens']:>11}{r['seconds']:>9.1f}", flush=True)
        if args.out:  # after every task, so a long run that stops keeps what it finished
            common.write_json(out / "results.json", {"args": vars(args), "results": results})
            common.write_text(out / "predictions.jsonl",
                              "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))


if __name__ == "__main__":
    common.run(main)
