"""What a run leaves and shows: its folder (one writer), the log and the console, the resume state a kill never
corrupts, and the report (the chosen and the final model scored on the test split, and saved).

    python train.py ... --out runs/x            # runs/x/{lock, args.json, log.jsonl, state/, snapshots/, model/}
    python train.py ... --out runs/x --resume   # the same run, from its last committed checkpoint

One writer: OUT/lock is flock'ed for the whole run (claim). After every evaluation save_state writes the model and
the Adam moments to new files (under FSDP each rank its shards), then replaces state.json, the commit point;
load_state refuses a changed mixture or checkpoint (the fingerprint) and another FSDP world. Every file is written
through common.atomic: a kill or a full disk leaves the old one whole.
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path

import common
import data
import hub
from common import print0

_LOCKS = {}  # folder -> the open lock file this process holds


def holder(folder: Path) -> str | None:
    """The pid of the live process that holds folder/lock, or None when no live process holds it."""
    try:
        f = open(folder / "lock", "a+")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def lock(out: Path):
    """An exclusive lock on OUT/lock, held until this process ends (the OS releases it on a kill too): a second
    process that wants to write the same folder, or a folder inside it, is refused, naming the holder's pid. One
    writer per folder: train.py takes its --out, evaluate.py its --out."""
    key = Path(out).resolve()
    if key in _LOCKS:
        return
    for folder in [p for p in key.parents if (p / "lock").is_file() and p not in _LOCKS]:
        if pid := holder(folder):
            raise SystemExit(f"{out} is inside {folder}, the folder of a live run (pid {pid}): write elsewhere, or "
                             "wait for that run to end")
    key.mkdir(parents=True, exist_ok=True)
    f = open(key / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"{out} is in use by another run (pid {pid}): wait for it or stop it, or choose another "
                         "--out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f


def clear(out: Path):
    """Everything in OUT but its lock: a fresh start in a folder a killed run left without a checkpoint."""
    for p in out.iterdir():
        if p.name != "lock":
            common.remove(p)


def resume_args(args, given: set[str]):
    """`--resume --out RUN` alone continues RUN: its own arguments from RUN/args.json, with the flags the command
    line names again on top (claim refuses those that differ, but for --lr and --progress)."""
    saved = common.read_json(Path(args.out) / "args.json", checked=True)
    return argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in given}, "resume": True})


def claim(args) -> bool:
    """Take --out for this run (its lock, on rank 0): refuse a finished run, a live one, a resume that cannot be
    one; a resume without a committed checkpoint starts afresh. Returns whether the run resumes."""
    out = Path(args.out)
    if common.rank() == 0:
        lock(out)
    state_json = out / "state" / "state.json"
    if (out / "summary.json").is_file():
        leftovers = [out / f for f in ("state", "snapshots") if (out / f).exists()]
        if leftovers and common.rank() == 0 and not common.read_json(out / "args.json", checked=True)["keep_state"]:
            for f in leftovers:  # a kill cut the finished run's cleanup short: finish it
                common.remove(f)
        raise SystemExit(f"{out} holds a finished run (summary.json): choose another --out, or remove it")
    if args.resume and args.snapshots == "memory":
        raise SystemExit("--resume: a run with --snapshots memory lost its snapshots with its process; "
                         "runs that must survive a kill use --snapshots disk")
    if not args.resume and state_json.is_file():
        raise SystemExit(f"{out} holds a run that can continue: pass --resume to continue it, or choose another --out")
    _, _, _, world, device = common.setup(args.device)
    if args.resume and common.all_sum(state_json.is_file(), device) not in (0, world):
        raise SystemExit(f"--resume: {state_json} is there for some ranks only: --out must be on a filesystem "
                         f"every node sees to resume (README, multi-node)")
    if args.resume and not state_json.is_file():
        print0(f"--resume: {out} has no committed checkpoint (killed before its first evaluation ended): "
               "starting it afresh")
        args.resume = False
    if args.resume:
        saved = common.read_json(out / "args.json", checked=True)
        diff = {k: (saved.get(k), v) for k, v in vars(args).items()
                if k not in ("resume", "progress", "lr") and saved.get(k) != v}
        if diff:
            raise SystemExit(f"--resume with other arguments than the run in {out}: {diff} (saved, given); "
                             f"only --lr and --progress may change")
        s = common.read_json(state_json, checked=True)
        if s["fsdp"] and s["world"] != world:
            raise SystemExit(f"--resume: {out} holds FSDP shards of {s['world']} ranks, and this is {world}: resume "
                             f"it as it ran, torchrun --nproc_per_node={s['world']} (x nodes) train.py --resume "
                             f"--out {out}")
    elif common.rank() == 0:  # a fresh start: whatever a run killed before its first checkpoint left goes
        clear(out)
    common.barrier()
    return args.resume


def fingerprint(run) -> dict[str, str]:
    """sha256 digests of every byte that --resume must find unchanged: the mixture (manifest and each split file of
    the run's tasks) and the checkpoint (config, tokenizer and every weight file, whole). At the 1.4 GB/s measured
    here that is 0.2 s for SmolLM2-135M and about 11 s for a 7B checkpoint in bf16 (15 GB), once a start."""
    def digest(paths):
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                h.update(p.name.encode() + hashlib.file_digest(f, "sha256").digest())
        return h.hexdigest()
    t0, d, m = time.time(), run.data_dir, run.model_dir
    files = {"data": [d / "manifest.json"] + [d / t / f"{s}.jsonl" for t in run.tasks for s in data.SPLITS],
             "model": [p for p in (m / "config.json", m / "tokenizer.json") if p.is_file()] + hub.safetensors_files(m)}
    out = {k: digest(paths) for k, paths in files.items()}
    size = sum(p.stat().st_size for paths in files.values() for p in paths)
    print0(f"inputs fingerprinted for --resume: {size / 1e9:.2f} GB in {time.time() - t0:.1f} s")
    return out


# -----------------------------------------------------------------------------
# the log and the console

def open_log(run, keep_lines: int = 0):
    """OUT/log.jsonl opened for appending (rank 0); on resume first cut to the `keep_lines` events the checkpoint
    saw, since what came after it will be done again."""
    path = run.out / "log.jsonl"
    run.pace = {"printed": time.time(), "last": time.time(), "epoch_s": None, "eval_s": None, "dropped": []}
    if run.rank == 0:
        if keep_lines:
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if len(lines) < keep_lines:
                raise SystemExit(f"--resume: {path} has {len(lines)} lines but the checkpoint in {run.out}/state was "
                                 f"taken after {keep_lines}: the log is not this run's, or was cut")
            common.write_text(path, "".join(lines[:keep_lines]))
            for e in map(json.loads, lines[:keep_lines]):  # what the console says at the end: every exclusion
                if e["event"] == "decision" and e["kind"] == "drop" and e["rollback_epoch"] is not None:
                    run.pace["dropped"] += [f"{t} (stage {e['stage']}, epoch {e['rollback_epoch']:.2f})"
                                            for t in e["excluded"]]
        run.log_file = open(path, "a")
    run.log_lines = keep_lines


def log(run, event: dict):
    """One event (with its step and time) into log.jsonl on rank 0, flushed as it happens, and onto the console;
    what it cost counted by Appendix F's rules (flops.FlopCounter.count_paper)."""
    event = {"event": event["event"], "step": run.step, "time": round(time.time(), 3), **event}
    run.flops.count_paper(event, run.last_eval, stage_wise=run.args.method == "msft")
    run.log_lines += 1
    if run.rank == 0:
        run.log_file.write(json.dumps(event) + "\n")
        run.log_file.flush()
        os.fsync(run.log_file.fileno())
    console(run, event)


def console(run, event: dict):
    """What a person watching sees: each evaluation, decision and the end as they happen, in words, and a training
    line every --progress seconds with the time left to the end of this stage (mSFT, continual SFT) or run."""
    a, pace, kind, e = run.args, run.pace, event["event"], event
    since, pace["last"] = e["time"] - pace["last"], e["time"]  # seconds since the event before
    if kind == "train":
        rate = e["tokens"] / e["tok_per_s"] * run.sampler.size / e["examples"]  # seconds an epoch
        pace["epoch_s"] = rate if pace["epoch_s"] is None else 0.9 * pace["epoch_s"] + 0.1 * rate
        if a.progress and time.time() - pace["printed"] >= a.progress:
            pace["printed"] = time.time()
            stage = a.method in ("msft", "continual")
            end = min(run.segment[1] + a.budget, a.max_epochs or math.inf) if stage else run.sft_epochs
            left = max(end - run.epoch, 0.0)
            eta = left * pace["epoch_s"] + math.ceil(left / a.interval - 1e-9) * (pace["eval_s"] or 0.0)
            print0(f"step {run.step:6d} | epoch {run.epoch:7.3f} | loss {e['loss']:.4f} | {e['tok_per_s']:8.0f} tok/s "
                   f"| {'stage' if stage else 'run'} ends in {eta / 60:5.1f} min")
    elif kind == "eval":
        pace["eval_s"] = since
        if a.progress:
            scores = "  ".join(f"{t} {x:.3f}" for t, x in sorted(e["scores"].items()))
            print0(f"eval  stage {e['stage']} epoch {e['epoch']:.2f} | avg {e['avg']:.4f} | {scores} | {since:.0f} s")
    elif kind == "decision":
        if e["kind"] == "drop" and e["rollback_epoch"] is not None:  # mSFT's
            pace["dropped"] += [f"{t} (stage {e['stage']}, epoch {e['rollback_epoch']:.2f})" for t in e["excluded"]]
            what = (f"{', '.join(e['excluded'])} peaked first, at epoch {e['rollback_epoch']:.2f}: excluded, and the "
                    "model rolled back there")
        elif e["kind"] == "drop":  # SRO's
            what = f"{', '.join(e['excluded'])} reached its searched peak: no longer trained"
        elif e["kind"] == "no_drop":
            what = f"every active task still improving at the stage's end (epoch {e['epoch']:.2f}): none excluded"
        elif e["kind"] == "next_task":
            what = (f"{e['task']} done, rolled back to its best (epoch {e['rollback_epoch']:.2f}); "
                    f"next: {e['next_task']}")
        else:  # search, weights
            what = ", ".join(f"{k} {e[k]}" for k in ("peaks", "weights") if e.get(k))
        print0(f"stage {e['stage']} {e['kind']}: {what}")
    elif kind == "end":
        gone = f"; excluded {', '.join(pace['dropped'])}" if pace["dropped"] else ""
        print0(f"end of {a.method} at epoch {e['epoch']:.2f}{gone}; the chosen checkpoint (best average over all "
               f"tasks): epoch {e['best_epoch']:.2f}, {e['best_avg']:.4f}")


# -----------------------------------------------------------------------------
# the resume state

def state_file(run, name: str, tag: str) -> str:
    return "-".join(filter(None, (name, tag, run.part))) + ".safetensors"  # part: fsdp.py's rank


def start(run):
    """A fresh run: its fingerprint, args.json, an empty log. There is no method state to continue."""
    run.fingerprint = fingerprint(run)
    if run.rank == 0:
        common.write_json(run.out / "args.json", vars(run.args), checked=True)
    open_log(run)
    return None


def save_state(run, state):
    """Everything needed to continue after this evaluation (Run.checkpoint). The tensors go to new files (under FSDP
    one per rank, its shards); state.json, replaced atomically by rank 0 once every rank's files are written, names
    them and is the commit point: a kill at any moment leaves the previous checkpoint whole."""
    folder, tag = run.out / "state", f"{run.log_lines:09d}"  # the same on every rank, new at every checkpoint
    if run.holds_snapshots:
        folder.mkdir(exist_ok=True)
        opt = {}  # Adam's moments and step by parameter index; safetensors holds no 0-d tensor: the step as (1,)
        for i, p in enumerate(run.model.parameters()):
            for k, v in run.opt.state.get(p, {}).items():
                opt[f"{i}.{k}"] = run.local(v).detach().cpu().reshape(-1 if v.dim() == 0 else run.local(v).shape)
        for name, tensors in (("model", run.snapshot()), ("optimizer", opt)):
            common.save_tensors(folder / state_file(run, name, tag), tensors, state_file(run, name, tag))
    common.barrier()
    if run.rank == 0:
        common.write_json(folder / "state.json", {
            "tag": tag, "fsdp": run.args.fsdp, "world": run.world, "fingerprint": run.fingerprint,
            "run": run.state_dict(), "method": state.to_json() if hasattr(state, "to_json") else state}, checked=True)
    common.barrier()
    if run.holds_snapshots:  # what the new state.json does not name is an older checkpoint: each rank its own
        keep = {state_file(run, name, tag) for name in ("model", "optimizer")}
        for f in [*folder.glob(state_file(run, "*", "*")), *folder.glob("." + state_file(run, "*", "*") + ".tmp")]:
            if f.name not in keep:
                f.unlink()


def read_state(run) -> dict:
    """state.json, checked, with the keys a resume reads: a damaged or foreign file is named, not a KeyError."""
    path = run.out / "state" / "state.json"
    s = common.read_json(path, checked=True)
    missing = [k for k in ("tag", "fsdp", "world", "fingerprint", "run", "method") if k not in s]
    if missing:
        raise ValueError(f"{path}: no {missing} (not a state this code wrote){common.CANNOT}")
    return s


def load_tensors(run, name: str, tag: str) -> dict:
    if not (run.holds_snapshots or not run.args.fsdp):  # without FSDP every rank reads rank 0's whole files
        return {}
    return common.load_tensors(run.out / "state" / state_file(run, name, tag), state_file(run, name, tag))


def load_state(run):
    """The run as save_state left it (model, Adam moments, the run's state_dict, log cut to its length); returns the
    method's own state to continue from."""
    s = read_state(run)
    run.fingerprint = fingerprint(run)
    changed = [k for k in run.fingerprint if s["fingerprint"].get(k) != run.fingerprint[k]]
    if changed:
        what = {"data": f"the mixture in --data {run.args.data}", "model": f"the checkpoint {run.model_dir}"}
        raise SystemExit(f"--resume: {' and '.join(what[k] for k in changed)} changed since the run in "
                         f"{run.out} began (files differ from its fingerprint): resume with the same files, or "
                         f"start a new run in another --out")
    run.restore(load_tensors(run, "model", s["tag"]))
    opt = common.load_tensors(run.out / "state" / state_file(run, "optimizer", s["tag"]),
                              state_file(run, "optimizer", s["tag"]))
    for i, p in enumerate(run.model.parameters()):
        st = {k.split(".", 1)[1]: v.to(run.device) for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
        if st:
            run.opt.state[p] = {k: v.reshape(()) if k == "step" else run.like(p, v) for k, v in st.items()}
    run.load_state_dict(s["run"])
    saved_lr = common.read_json(run.out / "args.json", checked=True)["lr"]
    open_log(run, s["run"]["log_lines"])
    if run.rank == 0:
        common.write_json(run.out / "args.json", vars(run.args), checked=True)
    m = s["method"]
    print0(f"resumed {run.out} from its last checkpoint: epoch {run.epoch:.2f}, step {run.step}"
           + (f", stage {m['stage']}" if "stage" in m else "") + f" ({s['run']['log_lines']} log events kept)")
    if saved_lr != run.args.lr:
        run.log({"event": "change", "lr": [saved_lr, run.args.lr], "epoch": run.epoch})
    return m


# -----------------------------------------------------------------------------
# what a run leaves: the model, the report, and nothing else

def export(run, folder: Path):
    """The model as it is, in hub layout in the dtype it was trained and scored in, with the source checkpoint's
    tokenizer files: transformers loads it. A sharded model is gathered one tensor at a time (every rank goes
    through all of them), and rank 0 writes each shard file as it fills."""
    tensors = run.full_tensors()
    if run.rank != 0:
        for _ in tensors:  # every rank takes part in every gather
            pass
        return
    hub.save_pretrained(run.model, folder, tensors=tensors,
                        copy=[run.model_dir / f for f in hub.TOKENIZER_FILES if (run.model_dir / f).is_file()])


def diverged(run, error):
    """After a non-finite loss: the last committed checkpoint's parameters into OUT/model, and how to go on."""
    run.log({"event": "error", "message": str(error)})
    s = read_state(run)
    run.restore(load_tensors(run, "model", s["tag"]))
    export(run, run.out / "model")
    raise SystemExit(f"stopping: {error}. The last good checkpoint (epoch {s['run']['epoch']:.2f}) is in "
                     f"{run.out}/model; continue from it with a smaller learning rate: the same command with "
                     f"--resume --lr {run.args.lr / 10:g}")


def report(run, store, best: dict, last: dict) -> dict:
    """The report (docs/protocol.md): the global best and the final model, each scored on the test split; the best saved in
    model/ (and the final one in final-model/ with --save-final), summary.json written last: from then on the run
    is finished, and its resume state and snapshots go (unless --keep-state)."""
    a = run.args
    final_scores = run.evaluate(run.tasks, split="test", final=True)
    rows = {t: r["n"] for t, r in run.last_eval.items()}  # what each test score is over: every row, --eval-limit or not
    if a.save_final:
        export(run, run.out / "final-model")
    scores = final_scores
    if best["id"] != last["id"]:
        run.restore(store.load(best["id"]))
        scores = run.evaluate(run.tasks, split="test", final=True)
    mean = lambda s: sum(s.values()) / len(s)
    final = {"event": "final", "best_epoch": best["epoch"], "best_checkpoint": best["id"], "best_avg": best["avg"],
             "test_rows": rows, "scores": scores,
             "test_avg": mean(scores), "final_epoch": last["epoch"], "final_scores": final_scores,
             "final_test_avg": mean(final_scores), "flops": run.flops.report(), "peak_snapshots": store.peak_held}
    run.log(final)
    export(run, run.out / "model")
    common.barrier()
    if run.rank == 0:
        common.write_json(run.out / "summary.json", {
            "args": vars(a), "method": a.method, "tasks": run.tasks, "best_epoch": best["epoch"],
            "best_checkpoint": best["id"], "test_rows": rows,
            **({"best_mixture_epoch": best["mixture_epoch"]} if "mixture_epoch" in best else {}),
            "selection_avg": best["avg"], "test_scores": scores, "test_avg": final["test_avg"],
            "final_epoch": last["epoch"], "final_test_scores": final_scores, "final_test_avg": final["final_test_avg"],
            "flops": final["flops"], "peak_snapshots": store.peak_held, "steps": run.step, "train_tokens": run.tokens,
            "dropped_too_long": run.dropped, "n_params": run.n_params, "wall_time_s": time.time() - run.t0})
        if not a.keep_state:  # the resume state and the snapshots: model/ holds what the run chose
            for folder in ("state", "snapshots"):
                common.remove(run.out / folder)
        print0(f"done: best epoch {best['epoch']:.2f}, test avg {final['test_avg']:.4f} (final model, epoch "
               f"{last['epoch']:.2f}: {final['final_test_avg']:.4f}), {final['flops']['total']:.3e} FLOPs -> "
               f"{run.out}/summary.json, {run.out}/model")
    return final
