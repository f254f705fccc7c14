"""The run folder: one writer at a time, the resume state a kill never corrupts, the files a run leaves behind.

    python train.py ... --out runs/x            # writes runs/x/{lock,args.json,log.jsonl,state/,snapshots/,model/}
    python train.py ... --out runs/x --resume   # load_state: the same run, from its last committed checkpoint

One writer: OUT/lock is flock'ed for the whole run (lock_folder). The state: after every evaluation save_state
writes the model and Adam moments to new files (under FSDP each rank its shards) and then replaces state.json, the
commit point, atomically; load_state refuses a changed mixture or checkpoint (fingerprint) and another FSDP world.
Every rewrite here goes through a temporary name (write_text), so a kill or a full disk leaves the old file whole.
"""
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import data
import parallel


def write_text(path: Path, text: str):
    """Written to a temporary name and renamed: a kill or a full disk never leaves half a file under the name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2))


_LOCKS = {}  # folder -> the open lock file this process holds


def lock_folder(out: Path):
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


def clear_folder(out: Path):
    """Everything in OUT but its lock: a fresh start in a folder a killed run left without a checkpoint."""
    for p in out.iterdir():
        if p.name != "lock":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def save_model(run, model_dir: Path, folder: Path):
    """The model as it is, in hub layout in --save-dtype, with the source checkpoint's tokenizer files: transformers
    loads it. A sharded model is gathered one tensor at a time, and rank 0 writes each shard file as it fills."""
    tensors = parallel.full_tensors(run.model.state_dict())
    if run.rank != 0:
        for _ in tensors:  # every rank takes part in every gather
            pass
        return
    run.model.save_pretrained(folder, dtype=run.save_dtype, tensors=tensors)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (model_dir / f).is_file():
            shutil.copy(model_dir / f, folder / f)


def source_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the source checkpoint stores its weights in (that of its first tensor)."""
    from safetensors import safe_open
    from model import safetensors_files
    with safe_open(safetensors_files(model_dir)[0], framework="pt") as st:
        kind = st.get_slice(next(iter(st.keys()))).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(kind, torch.float32)


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
    from model import safetensors_files
    data_files = [data_dir / "manifest.json"] + [data_dir / t / f"{s}.jsonl" for t in tasks for s in data.SPLITS]
    config = [p for p in (model_dir / "config.json", model_dir / "tokenizer.json") if p.is_file()]
    return {"data": digest(data_files), "model": digest(config) + digest(safetensors_files(model_dir), sample=True)}


def state_file(run, name: str, tag: str) -> str:
    return f"{name}-{tag}" + (f"-rank{run.rank:05d}-of-{run.world:05d}" if run.fsdp else "") + ".safetensors"


def save_state(run, state):
    """Everything needed to continue after this evaluation (Run.checkpoint). The tensors go to new files (under
    FSDP one per rank, its shards); state.json, replaced atomically by rank 0 once every rank's files are written,
    names them and is the commit point: a kill at any moment leaves the previous checkpoint whole."""
    folder = run.out / "state"
    tag = f"{run.log_lines:09d}"  # the same on every rank, and new at every checkpoint of this run's log
    if run.holds_snapshots:
        folder.mkdir(exist_ok=True)
        opt = {}
        for i, p in enumerate(run.model.parameters()):
            for k, v in run.opt.state.get(p, {}).items():
                v = parallel.local(v).detach().cpu()
                opt[f"{i}.{k}"] = v.reshape(-1) if v.dim() == 0 else v
        for name, tensors in (("model", run.snapshot()), ("optimizer", opt)):
            path = folder / state_file(run, name, tag)
            save_file(tensors, path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
    parallel.barrier()
    if run.rank == 0:
        write_json(folder / "state.json", {
            "tag": tag, "sharded": run.fsdp, "world": run.world, "fingerprint": run.fingerprint,
            "loop": state.to_json() if hasattr(state, "to_json") else state,
            "sampler": run.sampler.state_dict(), "segment": run.segment, "epoch": run.epoch,
            "step": run.step, "tokens": run.tokens, "paper_last": run.paper_last, "excluded": run.excluded,
            "flops": run.flops.state_dict(), "log_lines": run.log_lines, "elapsed": time.time() - run.t0})
    parallel.barrier()
    if run.holds_snapshots:  # what the new state.json does not name is an older checkpoint: each rank its own
        keep = {state_file(run, name, tag) for name in ("model", "optimizer")}
        for f in folder.glob(state_file(run, "*", "*")):
            if f.name not in keep:
                f.unlink()


def load_state(run) -> dict:
    """The run as save_state left it (model, Adam moments, sampler, counters, log cut to its length); returns the
    method's own state to continue from."""
    path = run.out / "state"
    s = json.loads((path / "state.json").read_text())
    changed = [k for k in run.fingerprint if s["fingerprint"].get(k) != run.fingerprint[k]]
    if changed:
        what = {"data": f"the mixture in --data {run.args.data}", "model": f"the checkpoint {run.model_dir}"}
        raise SystemExit(f"--resume: {' and '.join(what[k] for k in changed)} changed since the run in "
                         f"{run.out} began (files differ from its fingerprint): resume with the same files, or "
                         f"start a new run in another --out")
    if s["sharded"] and s["world"] != run.world:
        raise SystemExit(f"--resume: {path} holds FSDP shards of {s['world']} ranks; resume it with "
                         f"--nproc_per_node x nodes = {s['world']}")
    holder = run.holds_snapshots or not run.fsdp  # without FSDP every rank reads rank 0's whole files
    run.restore(load_file(path / state_file(run, "model", s["tag"])) if holder else {})
    opt = load_file(path / state_file(run, "optimizer", s["tag"]))
    for i, p in enumerate(run.model.parameters()):
        st = {k.split(".", 1)[1]: v.to(run.device) for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
        if st:
            st["step"] = st["step"].reshape(())
            if hasattr(p, "to_local"):  # this rank's shard of each moment, as a DTensor like its parameter
                from torch.distributed.tensor import DTensor
                st = {k: v if k == "step" else DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                                  shape=p.shape, stride=p.stride())
                      for k, v in st.items()}
            run.opt.state[p] = st
    run.sampler.load_state_dict(s["sampler"])
    run.segment, run.epoch, run.step, run.tokens = s["segment"], s["epoch"], s["step"], s["tokens"]
    run.paper_last, run.excluded = s["paper_last"], s["excluded"]
    run.flops.load_state_dict(s["flops"])
    run.t0 = time.time() - s["elapsed"]
    run.open_log(s["log_lines"])
    return s["loop"]


def export_last_good(run) -> float:
    """After a NaN: the last committed checkpoint's parameters into OUT/model (loadable), its epoch returned."""
    path = run.out / "state"
    s = json.loads((path / "state.json").read_text())
    run.restore(load_file(path / state_file(run, "model", s["tag"])) if run.holds_snapshots or not run.fsdp
                 else {})
    save_model(run, run.model_dir, run.out / "model")
    return s["epoch"]
