"""Run several fine-tuning methods on one mixture and write the paper's comparison: tables and plots.

    python compare.py                                               # the built-in demo mixture: sft and msft
    python compare.py --methods sft msft continual sro soft-sro ies dynamix --model M --data D --out runs/cmp
    python compare.py --methods sft msft --seeds 20 21 22 --out runs/cmp -- --budget 0.5 --signal loss
    python compare.py --report runs/cmp                             # only rebuild the tables and plots

Each method (and seed) is one `python train.py` subprocess writing to OUT/<method>[-seed<N>]/. A finished run
(summary.json present) is skipped, a killed one continued with train.py --resume, so the same command picks up
where it stopped. sft runs first: sro and soft-sro take its log as their search phase (--search-log). Flags after
`--` go to every train.py run. With no --model/--data the demo mixture is built in OUT/data and the demo's flags
are used (demo.DEMO_ARGS; flags after `--` override them).

Writes to OUT:
- table.md, table.json: per method the test score of the chosen checkpoint per task and on average, and the
  epoch of that checkpoint (the paper's Table 2); training, evaluation and total FLOPs, also relative to SFT
  (its Table 7). With several seeds every cell is mean ± sample std.
- curves.png (with matplotlib, installed by requirements-dev.txt): a panel per task, every method's selection score
  over epochs overlaid, each exclusion starred and each roll-back drawn as a jump back in epoch (the paper's Figures
  2 and 9); loss.png: the training loss over epochs, log scale; task_loss.png: each task's training loss.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import common
import demo
import train

REPO = Path(__file__).resolve().parent
SEARCH = ("sro", "soft-sro")  # their search phase is an SFT run: they read its log
SET_HERE = ("method", "model", "data", "out", "resume", "search_log")  # train.py flags this script sets per run
SUMMARY_KEYS = ("method", "tasks", "test_scores", "test_avg", "best_epoch", "best_checkpoint", "flops")
FLOPS = ("train", "eval", "total", "paper_eval", "paper_total", "test")  # flops.FlopCounter.report()'s, per run
EPS = 1e-9
# train.py flags that change what a score or a FLOP count means: runs in one table must share them (seed aside)
SAME = ("model", "data", "tasks", "signal", "eval_limit", "eval_batch", "shots", "demos", "max_new_tokens", "select_on",
        "interval", "max_len", "lr", "batch_size", "loss_group", "precision", "max_epochs", "grad_clip")


# -----------------------------------------------------------------------------
# reading run folders

def read_run(folder: Path) -> dict:
    """{"name", "args", "log", "summary"} of one train.py output folder; summary is None while it is unfinished."""
    log_path = folder / "log.jsonl"
    if not log_path.is_file() or not (folder / "args.json").is_file():
        raise SystemExit(f"{folder}: no log.jsonl or args.json, so not a train.py run folder (remove it, or run it "
                         f"with compare.py)")
    log = []
    for n, line in enumerate(log_path.read_text().splitlines(), 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{log_path}:{n}: not a JSON line ({e})")
        if not isinstance(event, dict) or "event" not in event:
            raise SystemExit(f"{log_path}:{n}: expected a JSON object with an 'event' key")
        log.append(event)
    summary = None
    if (folder / "summary.json").is_file():
        summary = common.read_json(folder / "summary.json")
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise SystemExit(f"{folder}/summary.json: missing {missing} (expected train.py's summary)")
    return {"name": folder.name, "args": common.read_json(folder / "args.json"), "log": log, "summary": summary}


def find_runs(root: Path) -> dict[str, list[dict]]:
    """{method: its runs sorted by seed} for every ROOT/<method>[-seed<N>] folder, methods in train.METHODS order."""
    if not root.is_dir():
        raise SystemExit(f"{root}: not a folder")
    runs = {}
    for folder in sorted(root.iterdir()):
        method = re.fullmatch(r"(.+?)(?:-seed\d+)?", folder.name)[1]
        if folder.is_dir() and method in train.METHODS:
            runs.setdefault(method, []).append(read_run(folder))
    if not runs:
        raise SystemExit(f"{root}: no run folders named <method>[-seed<N>] with a method of {list(train.METHODS)}")
    for method, rs in runs.items():
        rs.sort(key=lambda r: r["args"]["seed"])
        seeds = [r["args"]["seed"] for r in rs]
        if len(set(seeds)) < len(seeds):
            raise SystemExit(f"{root}: two runs of {method} with the same seed ({[r['name'] for r in rs]}, seeds "
                             f"{seeds}); remove one")
        for r in rs:
            if r["summary"] and r["summary"]["method"] != method:
                raise SystemExit(f"{root}/{r['name']}/summary.json: method {r['summary']['method']!r}, but the "
                                 f"folder's name says {method!r}")
    return {m: runs[m] for m in train.METHODS if m in runs}


# -----------------------------------------------------------------------------
# the tables

def cell(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def make_table(runs: dict[str, list[dict]]) -> dict:
    """The numbers of both tables from the finished runs; unfinished ones are listed, not counted."""
    done = {m: [r for r in rs if r["summary"]] for m, rs in runs.items()}
    done = {m: rs for m, rs in done.items() if rs}
    if not done:
        raise SystemExit(f"no finished run (summary.json) among {[r['name'] for rs in runs.values() for r in rs]}")
    first = next(iter(done.values()))[0]
    tasks, signal = first["summary"]["tasks"], first["args"]["signal"]
    for r in (r for rs in done.values() for r in rs):  # a table compares like with like
        if r["summary"]["tasks"] != tasks or sorted(r["summary"]["test_scores"]) != sorted(tasks) \
                or r["args"]["signal"] != signal:
            raise SystemExit(f"{r['name']}: tasks {r['summary']['tasks']} and --signal {r['args']['signal']}, but "
                             f"{first['name']} has tasks {tasks} and --signal {signal}: compare runs of one mixture")
        differ = {k: (first["args"].get(k), r["args"].get(k)) for k in SAME if first["args"].get(k) != r["args"].get(k)}
        if differ:
            raise SystemExit(f"{first['name']} and {r['name']} ran with different flags that change scores or FLOPs: "
                             + ", ".join(f"--{k.replace('_', '-')} {a} and {b}" for k, (a, b) in differ.items())
                             + ": a table compares runs made alike (put these in separate folders)")
    methods = {}
    for m, rs in done.items():
        s = [r["summary"] for r in rs]
        methods[m] = {"runs": [r["name"] for r in rs], "seeds": [r["args"]["seed"] for r in rs],
                      "test_scores": {t: cell([x["test_scores"][t] for x in s]) for t in tasks},
                      "test_avg": cell([x["test_avg"] for x in s]),
                      "best_epoch": cell([x["best_epoch"] for x in s]),
                      "mixture_epoch": cell([x["best_mixture_epoch"] for x in s]) if "best_mixture_epoch" in s[0]
                      else None,
                      "flops": {k: cell([x["flops"][k] for x in s]) for k in FLOPS}}
    sft = methods.get("sft")
    for row in methods.values():  # differences and ratios of the means
        row["avg_minus_sft"] = row["test_avg"]["mean"] - sft["test_avg"]["mean"] if sft else None
        row["flops_over_sft"] = {k: row["flops"][k]["mean"] / sft["flops"][k]["mean"] if sft else None
                                 for k in ("train", "total", "paper_total")}
    return {"signal": signal, "tasks": tasks, "methods": methods,
            "unfinished": [r["name"] for rs in runs.values() for r in rs if not r["summary"]]}


def markdown(tbl: dict) -> str:
    acc = tbl["signal"] == "acc"

    def epoch(row):
        e = fmt(row["best_epoch"], digits=2)
        return e if row["mixture_epoch"] is None else f"{fmt(row['mixture_epoch'], digits=2)} ({e} per task)"
    scale, digits = (100, 1) if acc else (1, 4)  # accuracy in %, as in the paper

    def fmt(c, scale=1, digits=4, form="f"):
        s = f"{c['mean'] * scale:.{digits}{form}}"
        return s if c["std"] is None else f"{s} ± {c['std'] * scale:.{digits if form == 'f' else 1}{form}}"

    lines = ["# Test score of the chosen checkpoint per task (cf. the paper's Table 2)", "",
             ("Accuracy in %" if acc else "Minus the mean gold-answer token loss (--signal loss; higher is better)")
             + " on the test split, of the checkpoint each method chose on the selection split; epoch: that "
               "checkpoint's (continual SFT: in mixture-equivalent epochs, each task's weighted by its share, then "
               "the sum of per-task epochs). Several seeds: mean ± sample std.", "",
             "| method | seeds | " + " | ".join(tbl["tasks"]) + " | avg | avg − SFT | epoch |",
             "|---" * (len(tbl["tasks"]) + 5) + "|"]
    for m, row in tbl["methods"].items():
        d = row["avg_minus_sft"]
        delta = "—" if m == "sft" or d is None else f"{d * scale:+.{digits}f}"
        lines.append(f"| {m} | {', '.join(map(str, row['seeds']))} | "
                     + " | ".join(fmt(row["test_scores"][t], scale, digits) for t in tbl["tasks"])
                     + f" | {fmt(row['test_avg'], scale, digits)} | {delta} | {epoch(row)} |")
    lines += ["", "# FLOPs per method (cf. the paper's Table 7)", "",
              "6·N·D for training, 2·N·D for evaluation (flops.py). compute: the tokens each run processed (our "
              "evaluator computes a shared few-shot prefix once); paper: Appendix F's count of the same run (every "
              "evaluated prompt whole with its generated tokens; mSFT's excluded tasks once a stage). The final "
              "report on the test split is its own column, in neither total.", "",
              "| method | train | eval, compute | total, compute | eval, paper | total, paper | total / SFT, compute | "
              "total / SFT, paper | test report |", "|---" * 9 + "|"]
    for m, row in tbl["methods"].items():
        r = row["flops_over_sft"]
        ratios = [f"{r[k]:.2f}x" if r[k] is not None else "—" for k in ("total", "paper_total")]
        cells = [fmt(row["flops"][k], digits=3, form="e") for k in ("train", "eval", "total", "paper_eval",
                                                                       "paper_total")]
        lines.append(f"| {m} | " + " | ".join(cells + ratios) + f" | {fmt(row['flops']['test'], digits=3, form='e')} |")
    if "sft" not in tbl["methods"]:
        lines += ["", "No finished sft run: the columns relative to SFT are empty."]
    if tbl["unfinished"]:
        lines += ["", f"Unfinished runs, not in the tables: {', '.join(tbl['unfinished'])}."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the plots

def curves(log: list[dict]) -> dict:
    """One run's selection-score curves cut at each roll-back: {"segments": {task: [[(epoch, score), ...], ...]},
    "jumps": [(from_epoch, to_epoch)], "drops": [(epoch, task, score there, kind)]}. A drop (mSFT, SRO) or the end
    of a task (continual, kind next_task) is placed at its roll-back epoch, else where it was decided. After a
    roll-back each task's next segment starts at its score at the roll-back epoch: the curve jumps back."""
    segments, jumps, drops, last = {}, [], [], None

    def jump(to):
        jumps.append((last, to))
        for segs in segments.values():
            segs.append([p for p in segs[-1] if abs(p[0] - to) < EPS][-1:])

    for e in log:
        if e["event"] == "eval":
            if last is not None and e["epoch"] < last - EPS:  # back in epoch without a decision (a new phase)
                jump(e["epoch"])
            for t, s in e["scores"].items():
                seg = segments.setdefault(t, [[]])[-1]
                if seg and abs(seg[-1][0] - e["epoch"]) < EPS:  # the roll-back point evaluated again
                    seg.pop()
                seg.append((e["epoch"], s))
            last = e["epoch"]
        elif e["event"] == "decision" and e["kind"] in ("drop", "next_task"):
            back = e.get("rollback_epoch")
            at = back if back is not None else e.get("epoch", last)
            for t in e["excluded"] if e["kind"] == "drop" else [e["task"]]:
                score = [s for epoch, s in segments.get(t, [[]])[-1] if abs(epoch - at) < EPS]
                drops.append((at, t, score[-1] if score else None, e["kind"]))
            if back is not None and last is not None and back < last - EPS:
                jump(back)
                last = back
    return {"segments": segments, "jumps": jumps, "drops": drops}


def chosen_eval(run: dict) -> dict | None:
    """The eval event of the checkpoint a finished run chose, by its identity, not its epoch (after mSFT's roll-backs
    several checkpoints share an epoch): that checkpoint's last evaluation (SRO's search numbers its own first)."""
    if not run["summary"]:
        return None
    best = run["summary"]["best_checkpoint"]
    return [e for e in run["log"] if e["event"] == "eval" and e.get("checkpoint") == best][-1]


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """An exponential moving average: a step's loss over a handful of one task's examples is noisy."""
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def y_range(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The range of the curves from the first evaluation after the base model on, padded: the base model's
    far-off score would otherwise squash every curve into a line."""
    ys = [y for x, y in points if x > EPS] or [y for _, y in points]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    pad = 0.06 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def plot(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    """In OUT, [] without matplotlib:
    curves.png: a panel per task (the paper's Figures 2 and 9), every method's selection score over epochs on it,
      each roll-back a jump back in epoch, a star where the method stopped training that task, a ring at the
      checkpoint it chose;
    loss.png: the training loss over epochs trained, a line per method, log scale (a column per seed);
    task_loss.png: each task's training loss over epochs trained, a panel per task, a line per method (smoothed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib); the tables are written")
        return []

    def save(fig, path):
        fig.tight_layout()
        fig.savefig(path.with_name(path.name + ".tmp"), format="png", dpi=110)
        os.replace(path.with_name(path.name + ".tmp"), path)
        plt.close(fig)
        return path

    def grid(n):
        cols = min(n, 4)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    tasks = sorted({t for rs in runs.values() for r in rs for e in r["log"] if e["event"] == "eval"
                    for t in e["scores"]})
    color = {m: f"C{i % 10}" for i, m in enumerate(runs)}
    first = {m: rs[0] for m, rs in runs.items()}  # one seed a method keeps the panels readable
    signal = next(iter(first.values()))["args"]["signal"]
    paths = []

    fig, axes = grid(len(tasks))
    for ax, task in zip(axes, tasks):
        points = []
        for m, r in first.items():
            c = curves(r["log"])
            for i, seg in enumerate(c["segments"].get(task, [])):
                if seg:
                    ax.plot(*zip(*seg), color=color[m], lw=1.2, marker=".", ms=2.5, label=m if i == 0 else None)
                    points += seg
            for epoch, t, s, kind in c["drops"]:
                if t == task and s is not None:
                    ax.plot([epoch], [s], marker="*", ms=10, color=color[m], mec="k", mew=0.5)
            chosen = chosen_eval(r)
            if chosen and task in chosen["scores"]:
                ax.plot([chosen["epoch"]], [chosen["scores"][task]], marker="o", ms=8, mfc="none", color=color[m],
                        mew=1.2)
        if y_range(points):
            ax.set_ylim(*y_range(points))
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("selection accuracy" if signal == "acc" else "selection score (-loss)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="* dropped   o chosen", title_fontsize=7)
    fig.suptitle("selection score by epoch; the base model (epoch 0) is off the scale where far below", fontsize=9)
    paths.append(save(fig, out / "curves.png"))

    seeds = sorted({r["args"]["seed"] for rs in runs.values() for r in rs})
    fig, axes = plt.subplots(1, len(seeds), figsize=(6 * len(seeds), 4), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for m, rs in runs.items():
            for r in (r for r in rs if r["args"]["seed"] == seed):
                steps = [e for e in r["log"] if e["event"] == "train" and e.get("loss")]
                if steps:
                    ax.plot([e["epoch"] for e in steps], smooth([e["loss"] for e in steps], 0.2), lw=0.9,
                            color=color[m], label=m)
        ax.set_yscale("log")
        ax.set_title(f"training loss (smoothed), seed {seed}", fontsize=10)
        ax.set_xlabel("epochs trained (mSFT: along the kept path; roll-backs step back)", fontsize=8)
        ax.set_ylabel("loss per answer token, log scale", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    paths.append(save(fig, out / "loss.png"))

    fig, axes = grid(len(tasks))
    for ax, task in zip(axes, tasks):
        for m, r in first.items():
            pts = [(e["epoch"], e["task_loss"][task]) for e in r["log"]
                   if e["event"] == "train" and task in e.get("task_loss", {})]
            if pts:
                ax.plot([x for x, _ in pts], smooth([y for _, y in pts]), lw=0.9, color=color[m], label=m)
        ax.set_yscale("log")
        ax.set_title(f"{task}: training loss", fontsize=10)
        ax.set_xlabel("epochs trained", fontsize=8)
        ax.set_ylabel("loss per answer token (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    if axes[0].get_legend_handles_labels()[0]:  # logs from before task_loss have nothing to label
        axes[0].legend(fontsize=7)
    paths.append(save(fig, out / "task_loss.png"))
    return paths


def report(root: Path) -> dict:
    runs = find_runs(root)
    tbl = make_table(runs)
    common.write_text(root / "table.json", json.dumps(tbl, indent=1) + "\n")
    md = markdown(tbl)
    common.write_text(root / "table.md", md)
    print("\n" + md)
    for path in plot(runs, root):
        print(f"wrote {path}")
    print(f"wrote {root / 'table.md'}, {root / 'table.json'}")
    return tbl


# -----------------------------------------------------------------------------
# running the methods

def run_methods(args, extra: list[str]):
    for name, values in (("--methods", args.methods), ("--seeds", args.seeds or [])):
        if len(set(values)) < len(values):
            raise SystemExit(f"{name} {' '.join(map(str, values))}: a value is given twice")
    # the flags after `--`, checked at the door: train.py's own validation, and none of those set here per run
    given, default = vars(train.parse_args(extra)), vars(train.parse_args([]))
    clash = [k for k in SET_HERE + (("seed",) if args.seeds else ()) if given.get(k) != default.get(k)]
    if clash:
        raise SystemExit(f"flags after --: {['--' + k.replace('_', '-') for k in clash]} are set by compare.py "
                         f"(--methods, --model, --data, --out, --seeds); drop them")
    root = Path(args.out).resolve()
    if args.model is None and args.data is None:  # the built-in demo: its mixture, tiny model and flags
        demo.pin_arithmetic()  # for every train.py it runs: the same run on any x86 machine
        data_dir = demo.make_demo(root / "data")
        model = str(demo.demo_checkpoint(data_dir))
        extra = [x for k, v in demo.DEMO_ARGS.items() for x in (f"--{k.replace('_', '-')}", str(v))] + extra
    elif args.model is None or args.data is None:
        raise SystemExit("give both --model and --data (or neither, for the built-in demo)")
    else:
        data_dir = Path(args.data).resolve()
        if not data_dir.is_dir():
            raise SystemExit(f"--data {args.data}: not a folder (make one with `python data.py prepare`)")
        model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # else a hub id
    methods = sorted(args.methods, key=lambda m: m != "sft")  # sft first: sro and soft-sro read its log

    plan = []
    for seed in args.seeds or [None]:
        tag = "" if seed is None else f"-seed{seed}"
        for m in methods:
            argv = [*extra, "--method", m, "--model", model, "--data", str(data_dir), "--out", str(root / f"{m}{tag}")]
            argv += [] if seed is None else ["--seed", str(seed)]
            if m in SEARCH and "sft" in methods:
                argv += ["--search-log", str(root / f"sft{tag}" / "log.jsonl")]
            plan.append((root / f"{m}{tag}", argv, vars(train.parse_args(argv))))
    for folder, argv, want in plan:
        if (folder / "summary.json").is_file():
            saved = common.read_json(folder / "args.json")
            diff = {k: (saved.get(k), v) for k, v in want.items()
                    if k not in ("resume", "progress", "out", "search_log") and saved.get(k) != v}
            if diff:
                raise SystemExit(f"{folder} is a finished run with other arguments {diff} (saved, now): remove it "
                                 f"or choose another --out")
            print(f"{folder.name}: finished, skipped", flush=True)
            continue
        if (folder / "state" / "state.json").is_file():
            argv = [*argv, "--resume"]
            print(f"{folder.name}: resuming", flush=True)
        else:  # train.py starts afresh a folder whose run was killed before its first checkpoint
            print(f"{folder.name}: starting", flush=True)
        rc = run_child([sys.executable, str(REPO / "train.py"), *argv])
        if rc:
            raise SystemExit(f"train.py for {folder} exited with {rc} (its output is above); run the same command "
                             f"again to continue")
    return report(root)


def run_child(cmd: list[str]) -> int:
    """Run one train.py and wait for it; if compare.py is stopped (Ctrl-C, SIGTERM), the child is stopped too, so
    no orphan goes on writing a run folder that a later compare.py would take up."""
    child = subprocess.Popen(cmd)

    def stop(signum, frame):
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        raise SystemExit(f"stopped by signal {signum}: train.py (pid {child.pid}) stopped; the same command continues")
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # what follows goes to every train.py run
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=train.METHODS, default=None,
                   help="methods to run (default: sft msft)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the demo's tiny model)")
    p.add_argument("--data", default=None, help="mixture folder from `python data.py prepare` (default: the demo's)")
    p.add_argument("--out", default="runs/compare", help="where the run folders, tables and plots go")
    p.add_argument("--seeds", nargs="+", type=common.number(int, at_least=0), default=None,
                   help="one run per method and seed, in <method>-seed<N>/ (default: train.py's seed, in <method>/)")
    p.add_argument("--report", metavar="DIR", default=None, help="only rebuild the tables and plots of DIR's runs")
    args = p.parse_args(argv)
    if args.report is not None:
        given = [f for f, v in (("--methods", args.methods), ("--model", args.model), ("--data", args.data),
                                ("--seeds", args.seeds), ("flags after --", extra or None)) if v is not None]
        if given or args.out != p.get_default("out"):
            p.error(f"--report only reads the runs in DIR; drop {given or ['--out']}")
        return report(Path(args.report))
    args.methods = args.methods or ["sft", "msft"]
    return run_methods(args, extra)


if __name__ == "__main__":
    common.run(main)
