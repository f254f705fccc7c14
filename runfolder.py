"""What a run leaves and shows: its folder (one writer), the log and the console, the resume state a kill never
corrupts, and the report (the chosen and the final model scored on the test split, and saved).

    python train.py ... --out runs/x            # runs/x/{lock, args.json, log.jsonl, state/, snapshots/, model/}
    python train.py ... --out runs/x --resume   # the same run, from its last committed checkpoint

One writer: OUT/lock is flock'ed for the whole run (claim). After every evaluation save_state writes the model and
the Adam moments to new files (under FSDP each rank its shards), then replaces state.json, the commit point;
load_state refuses a changed mixture or checkpoint (the fingerprint) and another FSDP world. Every file is written
through common.atomic: a kill or a full disk leaves the old one whole.
"""
import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

import common
import data
import hub
from common import print0

_LOCKS = {}  # folder -> the open lock file this process holds


def lock(out: Path):
    """An exclusive lock on OUT/lock, held until this process ends (the OS releases it on a kill too): a second
    process that wants to write the same folder is refused, naming the holder's pid."""
    key = out.resolve()
    if key in _LOCKS:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise SystemExit(f"{out} is in use by another run (pid {holder}): wait for it or stop it, or choose another "
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


def claim(args) -> bool:
    """Take --out for this run (its lock, on rank 0): refuse a finished run, a live one, a resume that cannot be
    one; a resume without a committed checkpoint starts afresh. Returns whether the run resumes."""
    out = Path(args.out)
    if common.rank() == 0:
        lock(out)
    state_json = out / "state" / "state.json"
    if (out / "summary.json").is_file():
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
        saved = common.read_json(out / "args.json")
        diff = {k: (saved.get(k), v) for k, v in vars(args).items()
                if k not in ("resume", "progress", "lr") and saved.get(k) != v}
        if diff:
            raise SystemExit(f"--resume with other arguments than the run in {out}: {diff} (saved, given); "
                             f"only --lr may change")
    elif common.rank() == 0:  # a fresh start: whatever a run killed before its first checkpoint left goes
        clear(out)
    common.barrier()
    return args.resume


def fingerprint(data_dir: Path, tasks: list[str], model_dir: Path) -> dict[str, str]:
    """sha256 digests that --resume compares: the mixture (manifest and every split file of the run's tasks), and
    the checkpoint (config, tokenizer, each weight file's header and its first and last MiB: a changed file, not a
    full read of 15 GB)."""
    def digest(paths, sample=False):
        h = hashlib.sha256()
        for p in paths:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                if not sample:
                    h.update(f.read())
                    continue
                size = os.fstat(f.fileno()).st_size
                head = int.from_bytes(f.read(8), "little")  # safetensors: the JSON header's length
                f.seek(0)
                h.update(f.read(min(size, 8 + head + 2**20)))
                f.seek(max(0, size - 2**20))
                h.update(f.read() + str(size).encode())
        return h.hexdigest()
    data_files = [data_dir / "manifest.json"] + [data_dir / t / f"{s}.jsonl" for t in tasks for s in data.SPLITS]
    config = [p for p in (model_dir / "config.json", model_dir / "tokenizer.json") if p.is_file()]
    return {"data": digest(data_files), "model": digest(config) + digest(hub.safetensors_files(model_dir), sample=True)}


# -----------------------------------------------------------------------------
# the log and the console

def open_log(run, keep_lines: int = 0):
    """OUT/log.jsonl opened for appending (rank 0); on resume first cut to the `keep_lines` events the checkpoint
    saw, since what came after it will be done again."""
    path = run.out / "log.jsonl"
    if run.rank == 0:
        if keep_lines:
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if len(lines) < keep_lines:
                raise SystemExit(f"--resume: {path} has {len(lines)} lines but the checkpoint in {run.out}/state was "
                                 f"taken after {keep_lines}: the log is not this run's, or was cut")
            common.write_text(path, "".join(lines[:keep_lines]))
        run.log_file = open(path, "a")
    run.log_lines = keep_lines
    run.pace = {"printed": time.time(), "last": time.time(), "epoch_s": None, "eval_s": None}  # console()'s


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
    """What a person watching sees: each evaluation and decision, and a training line every --progress seconds with
    the time left to the end of this stage (mSFT, continual SFT) or run, at the pace so far."""
    a, pace, kind = run.args, run.pace, event["event"]
    since, pace["last"] = event["time"] - pace["last"], event["time"]  # seconds since the event before
    if kind == "train":
        rate = event["tokens"] / event["tok_per_s"] * run.sampler.size / event["examples"]  # seconds an epoch
        pace["epoch_s"] = rate if pace["epoch_s"] is None else 0.9 * pace["epoch_s"] + 0.1 * rate
        if a.progress and time.time() - pace["printed"] >= a.progress:
            pace["printed"] = time.time()
            stage = a.method in ("msft", "continual")
            end = min(run.segment[1] + a.budget, a.max_epochs or math.inf) if stage else run.sft_epochs
            left = max(end - run.epoch, 0.0)
            eta = left * pace["epoch_s"] + math.ceil(left / a.interval - 1e-9) * (pace["eval_s"] or 0.0)
            print0(f"step {run.step:6d} | epoch {run.epoch:7.3f} | loss {event['loss']:.4f} | "
                   f"{event['tok_per_s']:8.0f} tok/s | {'stage' if stage else 'run'} ends in {eta / 60:5.1f} min")
    elif kind == "eval":
        pace["eval_s"] = since
        if a.progress:
            scores = "  ".join(f"{t} {s:.3f}" for t, s in sorted(event["scores"].items()))
            print0(f"eval  stage {event.get('stage', '-')} epoch {event['epoch']:.2f} | avg {event['avg']:.4f} | "
                   f"{scores} | {pace['eval_s']:.0f} s")
    elif kind == "decision":
        print0(f"decision stage {event['stage']}: {event['kind']} {event.get('excluded') or ''} "
               f"roll back to epoch {event.get('rollback_epoch')}")


# -----------------------------------------------------------------------------
# the resume state

def state_file(run, name: str, tag: str) -> str:
    return "-".join(filter(None, (name, tag, run.part))) + ".safetensors"  # part: fsdp.py's rank


def start(run):
    """A fresh run: its fingerprint, args.json, an empty log. There is no method state to continue."""
    run.fingerprint = fingerprint(run.data_dir, run.tasks, run.model_dir)
    if run.rank == 0:
        common.write_json(run.out / "args.json", vars(run.args))
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
            with common.atomic(folder / state_file(run, name, tag)) as tmp:
                save_file(tensors, tmp)
    common.barrier()
    if run.rank == 0:
        common.write_json(folder / "state.json", {
            "tag": tag, "fsdp": run.args.fsdp, "world": run.world, "fingerprint": run.fingerprint,
            "run": run.state_dict(), "method": state.to_json() if hasattr(state, "to_json") else state})
    common.barrier()
    if run.holds_snapshots:  # what the new state.json does not name is an older checkpoint: each rank its own
        keep = {state_file(run, name, tag) for name in ("model", "optimizer")}
        for f in folder.glob(state_file(run, "*", "*")):
            if f.name not in keep:
                f.unlink()


def load_state(run):
    """The run as save_state left it (model, Adam moments, the run's state_dict, log cut to its length); returns the
    method's own state to continue from."""
    path = run.out / "state"
    s = common.read_json(path / "state.json")
    run.fingerprint = fingerprint(run.data_dir, run.tasks, run.model_dir)
    changed = [k for k in run.fingerprint if s["fingerprint"].get(k) != run.fingerprint[k]]
    if changed:
        what = {"data": f"the mixture in --data {run.args.data}", "model": f"the checkpoint {run.model_dir}"}
        raise SystemExit(f"--resume: {' and '.join(what[k] for k in changed)} changed since the run in "
                         f"{run.out} began (files differ from its fingerprint): resume with the same files, or "
                         f"start a new run in another --out")
    if s["fsdp"] and s["world"] != run.world:
        raise SystemExit(f"--resume: {path} holds FSDP shards of {s['world']} ranks; resume it with "
                         f"--nproc_per_node x nodes = {s['world']}")
    reads = run.holds_snapshots or not run.args.fsdp  # without FSDP every rank reads rank 0's whole files
    run.restore(load_file(path / state_file(run, "model", s["tag"])) if reads else {})
    opt = load_file(path / state_file(run, "optimizer", s["tag"]))
    for i, p in enumerate(run.model.parameters()):
        st = {k.split(".", 1)[1]: v.to(run.device) for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
        if st:
            run.opt.state[p] = {k: v.reshape(()) if k == "step" else run.like(p, v) for k, v in st.items()}
    run.load_state_dict(s["run"])
    saved_lr = common.read_json(run.out / "args.json")["lr"]
    open_log(run, s["run"]["log_lines"])
    if run.rank == 0:
        common.write_json(run.out / "args.json", vars(run.args))
    if saved_lr != run.args.lr:
        run.log({"event": "change", "lr": [saved_lr, run.args.lr], "epoch": run.epoch})
    return s["method"]


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
    s = common.read_json(run.out / "state" / "state.json")
    reads = run.holds_snapshots or not run.args.fsdp
    run.restore(load_file(run.out / "state" / state_file(run, "model", s["tag"])) if reads else {})
    export(run, run.out / "model")
    raise SystemExit(f"stopping: {error}. The last good checkpoint (epoch {s['run']['epoch']:.2f}) is in "
                     f"{run.out}/model; continue from it with a smaller learning rate: the same command with "
                     f"--resume --lr {run.args.lr / 10:g}")


def report(run, store, best: dict, last: dict) -> dict:
    """The report (SPEC 3): the global best and the final model, each scored on the test split; the best saved in
    model/ (and the final one in final-model/ with --save-final), summary.json written last: from then on the run
    is finished, and its resume state and snapshots go (unless --keep-state)."""
    a = run.args
    final_scores = run.evaluate(run.tasks, split="test", final=True)
    if a.save_final:
        export(run, run.out / "final-model")
    scores = final_scores
    if best["id"] != last["id"]:
        run.restore(store.load(best["id"]))
        scores = run.evaluate(run.tasks, split="test", final=True)
    mean = lambda s: sum(s.values()) / len(s)
    final = {"event": "final", "best_epoch": best["epoch"], "best_avg": best["avg"], "scores": scores,
             "test_avg": mean(scores), "final_epoch": last["epoch"], "final_scores": final_scores,
             "final_test_avg": mean(final_scores), "flops": run.flops.report(), "peak_snapshots": store.peak_held}
    run.log(final)
    export(run, run.out / "model")
    common.barrier()
    if run.rank == 0:
        common.write_json(run.out / "summary.json", {
            "args": vars(a), "method": a.method, "tasks": run.tasks, "best_epoch": best["epoch"],
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
