"""Fine-tune a language model on a mixture of tasks with SFT or mSFT, on one process or many (DDP).

    python train.py                                   # the built-in demo (demo.py): SFT, then mSFT, on a tiny model
    python train.py --method msft --model Qwen/Qwen2.5-0.5B --data mix --out runs/msft
    torchrun --standalone --nproc_per_node=8 train.py --method msft --model Qwen/Qwen2.5-0.5B --data mix --out runs/q
    python train.py --resume --out runs/msft          # continue a killed run from its last completed evaluation

Read in this order: loss_weights (the loss of one step), Run (the data, the model, one optimizer step, an evaluation,
a snapshot), run_sft, then run_msft, which hands the run to msft.run_msft (Algorithm 1); train() ties a method to its
run folder and reports. Beside this file, each behind the flag that asks for it: baselines.py (--method continual,
sro, soft-sro, ies, dynamix), fsdp.py (--fsdp), demo.py (no --model and --data), runfolder.py (the folder's lock, the
resume state, the exported model). --out gets log.jsonl (an event a line, as it happens), summary.json, model/.
"""
import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import common
import data
import flops
import msft
import runfolder
from common import print0
from evaluate import evaluate, load_demos
from hub import resolve_checkpoint
from model import Transformer

METHODS = ("sft", "msft", "continual", "sro", "soft-sro", "ies", "dynamix")


# -----------------------------------------------------------------------------
# arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    number = common.number
    # what to train
    p.add_argument("--method", choices=METHODS, default=None,
                   help="sft, msft, or a baseline of baselines.py (demo: sft and msft, one after the other)")
    p.add_argument("--model", default=None, help="checkpoint folder in hub layout, or a hub id (default: the demo's)")
    p.add_argument("--data", default=None, help="mixture folder from `python data.py prepare` (default: the demo's)")
    p.add_argument("--tasks", nargs="+", default=None, help="train on these tasks of the mixture only (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>, or runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed evaluation")
    # the algorithm (docs/protocol.md)
    p.add_argument("--budget", type=number(float, above=0, at_most=1e4), default=3.0, help="mSFT's C: epochs a stage")
    p.add_argument("--interval", type=number(float, above=0, at_most=1e4), default=0.25, help="epochs between evals")
    p.add_argument("--max-stages", type=number(int, at_least=1), default=10, help="mSFT stops after this many stages")
    p.add_argument("--max-epochs", type=number(float, above=0, at_most=1e4), default=None,
                   help="SFT and the baselines train this long (default 10); caps mSFT's epochs only when given")
    p.add_argument("--ties", choices=("first", "all"), default="first",
                   help="of the tasks peaking first together, exclude the first in the release's order, or all")
    p.add_argument("--signal", choices=("acc", "loss"), default="acc", help="score: accuracy, or minus the gold loss")
    p.add_argument("--eval-excluded", choices=("every", "rollback"), default="every",
                   help="evaluate excluded tasks at every checkpoint (the release), or once a stage (Appendix F)")
    p.add_argument("--snapshots", choices=("disk", "memory"), default="disk",
                   help="where roll-back snapshots live (memory: faster, but a killed run cannot resume)")
    # optimisation (the release: Adam lr 1e-5 constant, no warmup, no weight decay, no clipping, batch 64, seed 20)
    p.add_argument("--lr", type=number(float, above=0), default=1e-5, help="learning rate, constant")
    p.add_argument("--batch-size", type=number(int, at_least=1), default=64, help="examples a step, all ranks together")
    p.add_argument("--micro-batch", type=number(int, at_least=1), default=8,
                   help="a forward pass on one rank takes at most this many rows, each as long as the step's longest "
                        "example (packed) or this many examples (--padded)")
    p.add_argument("--padded", action="store_true", help="the release's micro-batches: each pass --micro-batch "
                   "examples padded to their longest, not the step's examples packed into rows (data.forward_passes)")
    p.add_argument("--loss-group", type=number(int, at_least=0), default=4,
                   help="the step's loss is the mean over groups of this many examples of each group's token-mean "
                        "loss, as the release's micro-batches of 4; 0: the token mean of the step")
    p.add_argument("--grad-clip", type=number(float, at_least=0), default=0.0, help="max gradient norm; 0: off")
    p.add_argument("--precision", choices=("auto", "fp32", "mixed", "bf16"), default="auto",
                   help="fp32: fp32 throughout; mixed: fp32 weights and Adam states, bf16 compute; bf16: pure bf16 "
                        "weights and Adam states, no master copy (the release); auto: mixed on cuda, else fp32")
    p.add_argument("--max-len", type=number(int, above=8), default=512, help="longer examples are dropped and counted")
    p.add_argument("--seed", type=number(int, at_least=0), default=20, help="seeds the data order and the shots")
    # evaluation
    p.add_argument("--shots", type=number(int, at_least=0), default=5, help="worked examples before each question")
    p.add_argument("--demos", default=None, help="JSON file {task: [{\"question\": ..., \"answer\": ...}, ...]}: these "
                   "demonstrations (the release's hand-picked ones) instead of --shots drawn from the training split")
    p.add_argument("--eval-limit", type=number(int, at_least=1), default=None, help="score checkpoints on the first N "
                   "selection rows a task (default: all; the test report takes every row)")
    p.add_argument("--eval-batch", type=number(int, at_least=1), default=32, help="questions decoded together")
    p.add_argument("--max-new-tokens", type=number(int, at_least=1), default=512, help="generation cap (--signal acc)")
    p.add_argument("--select-on", choices=("selection", "test"), default="selection",
                   help="split that scores checkpoints; 'test' reproduces the release (selects on the reported data)")
    # output and system
    p.add_argument("--keep-state", action="store_true", help="keep state/ and snapshots/ when the run finishes")
    p.add_argument("--save-final", action="store_true",
                   help="also save the model the method ended with in final-model/ (model/ is the global best)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and Adam states over the ranks "
                   "(FSDP2, fsdp.py), for models that do not fit whole on one GPU")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--device", type=common.device, default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block for training (default: on for cuda)")
    p.add_argument("--progress", type=number(float, at_least=0), default=15,
                   help="seconds between training lines on the console; 0: only decisions and the end")
    common.retired(p, {"--autocast": "use --precision mixed (fp32 weights, bf16 compute) or --precision fp32",
                       "--no-autocast": "use --precision fp32", "--quiet": "use --progress 0",
                       "--log-every": "use --progress SECONDS (log.jsonl has every step)",
                       "--save-dtype": "model/ holds the weights in the dtype they were trained and scored in"})
    import baselines  # the baselines' own flags, kept beside them
    baselines.add_flags(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    checks = [(args.interval <= args.budget, "--interval must be no larger than --budget"),
              (args.max_epochs is None or args.max_epochs >= args.interval, "--max-epochs must be at least --interval")]
    import baselines
    torchrun = [(not args.fsdp or "RANK" in os.environ, "--fsdp shards over ranks: run it under torchrun")]
    for ok, msg in checks + baselines.flag_checks(args) + torchrun:
        if not ok:
            p.error(msg)
    return args


# -----------------------------------------------------------------------------
# the loss of one optimizer step

def loss_weights(n_answer: list[int], group: int) -> list[float]:
    """Each example's weight per answer token, so that the step's loss is the weighted sum of token losses.
    group G: the global batch, in sampling order, cut into groups of G examples (the last may be smaller); the loss
    is the mean over groups of each group's token mean (the release: micro-batches of 4 examples, each a token
    mean, accumulated and averaged over ranks). group 0: the token mean over the whole step (STYLE rule 8)."""
    if group == 0:
        return [1 / sum(n_answer)] * len(n_answer)
    groups = [range(s, min(s + group, len(n_answer))) for s in range(0, len(n_answer), group)]
    w = [0.0] * len(n_answer)
    for g in groups:
        tokens = sum(n_answer[j] for j in g)
        for j in g:
            w[j] = 1 / (len(groups) * tokens)
    return w


class Diverged(Exception):
    """A step's loss was not finite."""


def parallelize(model: Transformer, args, device, ddp: bool):
    """Activation checkpointing, torch.compile and DDP, as the flags ask (torchtitan's `parallelize`; fsdp.py shards
    the model instead of DDP). Returns what the training step calls; the module itself stays as it is for
    evaluation, snapshots and saving (STYLE rule 9)."""
    for block in model.layers:
        block.checkpointing = args.activation_checkpointing
    if device.type == "cuda" if args.compile is None else args.compile:
        model.compile_blocks()
    if ddp:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


# -----------------------------------------------------------------------------
# the run: the data, the model, its optimizer, and the primitives every method is written with

class Run:
    """One training run, and its primitives (msft.run_msft's hooks): train, evaluate, snapshot, restore, log,
    checkpoint. Extension points (baselines.py): `before_step` callables run before each optimizer step, `on_losses`
    callables get each step's examples with their mean answer-token losses."""

    def __init__(self, args, model_dir: Path, data_dir: Path):
        self.args, self.out, self.model_dir, self.data_dir = args, Path(args.out), model_dir, data_dir
        self.ddp, self.rank, _, self.world, self.device = common.setup(args.device)
        torch.manual_seed(args.seed)
        self.tok, self.eos = data.load_tokenizer(model_dir)  # data: each training example tokenized once
        self.mixture = data.load_mixture(data_dir, args.tasks)
        self.tasks = sorted(self.mixture)
        self.demos = None if args.demos is None else load_demos(args.demos, self.tasks)
        self.train_enc, self.dropped = data.encode_mixture(self.tok, self.eos, self.mixture, args.max_len, data_dir)
        self.sampler = data.MixtureSampler({t: len(e) for t, e in self.train_enc.items()}, args.batch_size, args.seed)
        # [active tasks, origin epoch, examples trained since the origin] (train); epochs on the path to the model
        self.segment, self.epoch = [self.tasks, 0.0, 0], 0.0
        self.sft_epochs = msft.SFT_EPOCHS if args.max_epochs is None else args.max_epochs  # SFT's and the baselines'
        # the model: the module is evaluated, snapshotted and saved; `fwd` (DDP's wrapper) is what a step calls
        self.precision = {"auto": "mixed" if self.device.type == "cuda" else "fp32"}.get(args.precision, args.precision)
        self.autocast = torch.autocast(self.device.type, torch.bfloat16) if self.precision == "mixed" else nullcontext()
        self.holds_snapshots, self.part = self.rank == 0, ""  # rank 0 keeps whole copies (fsdp.py: each its shards)
        self.model = self.load_model(model_dir, torch.bfloat16 if self.precision == "bf16" else torch.float32)
        data.check_vocabulary(self.tok, self.model.config.vocab_size, model_dir)
        self.fwd = parallelize(self.model, args, self.device, ddp=self.ddp and not args.fsdp)
        self.new_optimizer()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.flops = flops.FlopCounter(self.n_params)
        self.step, self.tokens, self.log_lines, self.t0 = 0, 0, 0, time.time()
        self.before_step, self.on_losses, self.last_eval = [], [], {}

    def load_model(self, model_dir: Path, dtype) -> Transformer:
        return Transformer.from_pretrained(model_dir, device=self.device, dtype=dtype)

    def new_optimizer(self):
        # as the release: Adam afresh at every stage, lr constant, no weight decay, moments in the weights' dtype
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.args.lr, fused=self.device.type == "cuda")

    def log(self, event: dict):
        runfolder.log(self, event)  # into log.jsonl as it happens, and onto the console

    def train(self, active: list[str], origin: float, until: float):
        """Steps over the active mixture to the one nearest epoch `until`, counted from `origin`, where these tasks
        began to be trained together (a stage's start, an exclusion): rounding to whole steps never accumulates."""
        active = sorted(active)
        if self.segment is None or self.segment[:2] != [active, origin]:
            self.sampler.set_active(active)  # a new set of tasks starts a new pass; the same set goes on with its own
            self.segment, self.epoch = [active, origin, 0], origin
        target = round((until - origin) * self.sampler.size)
        while self.segment[2] + self.sampler.next_size() / 2 <= target:  # the step nearest the boundary
            self.train_step()

    def train_step(self):
        """One optimizer step on the next global batch: loss = sum of weight x summed answer-token loss over its
        examples, each rank running its share of the passes (data.forward_passes), the same at any world size."""
        for hook in self.before_step:
            hook()
        batch = self.sampler.next_batch()  # the global batch, in sampling order
        enc = [self.train_enc[t][i] for t, i in batch]
        n_answer = [sum(label != -100 for label in labels[1:]) for _, labels in enc]
        w = loss_weights(n_answer, self.args.loss_group)
        weight = torch.tensor(w, device=self.device)
        passes = data.forward_passes(enc, self.rank, self.world, self.args.micro_batch, self.eos, not self.args.padded)
        t0, sums = time.time(), torch.zeros(len(batch) + 2, dtype=torch.float64)  # per example; real, padded tokens
        for k, (part, tensors) in enumerate(passes):
            idx, targets, pos, docs = (x if x is None else x.to(self.device) for x in tensors)
            sync = k == len(passes) - 1 or not hasattr(self.fwd, "no_sync")  # DDP all-reduces after the last one
            with (nullcontext() if sync else self.fwd.no_sync()), self.autocast:
                losses = self.fwd(idx, targets, pos=pos, docs=docs)  # each row's, or each example's, summed loss
                at = (part or [0]) if docs is None else list(range(len(losses)))  # the examples they are of
                loss = (losses * weight[at] * bool(part)).sum()  # a rank with no example left still runs (weight 0)
            (loss * self.world).backward()  # DDP and FSDP average over ranks; undo that to get a plain sum
            if part:
                sums[at] += losses.detach().double().cpu()
                sums[-2:] += torch.tensor([sum(len(enc[j][0]) - 1 for j in part), idx.numel()])
        if dist.is_initialized():  # every rank gets every example's loss
            sums = sums.to(self.device)
            dist.all_reduce(sums)
        (*ex, real, padded), loss = sums.tolist(), sum(wj * x for wj, x in zip(w, sums.tolist()))
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss} at step {self.step + 1}")
        for hook in self.on_losses:
            hook(batch, [x / n for x, n in zip(ex, n_answer)])
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step, self.tokens, self.segment[2] = self.step + 1, self.tokens + real, self.segment[2] + len(batch)
        self.flops.train(real)
        self.epoch = self.segment[1] + self.segment[2] / self.sampler.size
        per_task = {t: [sum(x for (u, _), x in zip(batch, v) if u == t) for v in (ex, n_answer, [1] * len(ex))]
                    for t in sorted({t for t, _ in batch})}  # summed loss, answer tokens, examples
        self.log({"event": "train", "epoch": round(self.epoch, 6), "examples": len(batch), "loss": loss,
                  "task_loss": {t: s / n for t, (s, n, _) in per_task.items()}, "lr": self.args.lr,
                  "task_examples": {t: k for t, (_, _, k) in per_task.items()}, "tokens": int(real),
                  "tok_per_s": real / (time.time() - t0), "real_frac": real / padded})

    def evaluate(self, tasks: list[str], split: str | None = None, final: bool = False) -> dict[str, float]:
        """Scores of `tasks` (accuracy, or minus the gold-answer loss) on --select-on's split (its first --eval-limit
        rows) or `split`; a final evaluation (the report on the test split, every row) is counted apart in FLOPs."""
        a = self.args
        with self.autocast:
            res = evaluate(self.model, self.tok, self.eos, self.mixture, sorted(tasks), split or a.select_on,
                           shots=a.shots, seed=a.seed, demos=self.demos, limit=None if final else a.eval_limit,
                           batch_size=a.eval_batch, max_new_tokens=a.max_new_tokens, signal=a.signal,
                           progress=60 if a.progress else None)
        self.flops.add("test" if final else "eval", sum(r["tokens"] for r in res.values()))
        if final:
            self.flops.add("paper_test", sum(r["paper_tokens"] for r in res.values()))
        self.last_eval = res
        return {t: (r["acc"] if a.signal == "acc" else -r["loss"]) for t, r in res.items()}

    # what fsdp.py changes besides: a rank's shard of a tensor, a loaded shard laid out as its parameter, the whole
    # tensors to save gathered one at a time
    local = staticmethod(lambda t: t)
    like = staticmethod(lambda param, t: t)

    def full_tensors(self):
        return iter(self.model.state_dict().items())

    def snapshot(self) -> dict:
        """The parameters on the CPU (rank 0 keeps whole copies; the others nothing: restore broadcasts them)."""
        if not self.holds_snapshots:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if not (self.model.config.tie_embeddings and k == "lm_head.weight")}

    def restore(self, params: dict):  # a checkpoint's parameters, a fresh optimizer, and a new segment from here
        self.segment = None
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if k in params:
                    v.copy_(params[k])
                if self.ddp:
                    dist.broadcast(v, 0)
        self.new_optimizer()

    def state_dict(self) -> dict:  # what the run needs to continue exactly (runfolder.py saves model and Adam beside)
        return {"sampler": self.sampler.state_dict(), "segment": self.segment, "epoch": self.epoch, "step": self.step,
                "tokens": self.tokens, "flops": self.flops.state_dict(), "log_lines": self.log_lines,
                "elapsed": time.time() - self.t0}

    def load_state_dict(self, d: dict):
        self.sampler.load_state_dict(d["sampler"])
        self.segment, self.epoch, self.step, self.tokens = d["segment"], d["epoch"], d["step"], d["tokens"]
        self.flops.load_state_dict(d["flops"])
        self.log_lines, self.t0 = d["log_lines"], time.time() - d["elapsed"]

    def checkpoint(self, state):
        runfolder.save_state(self, state)  # everything needed to continue after this evaluation


# -----------------------------------------------------------------------------
# the methods: each is method(run, store, state) -> (best, last), and says which tasks are trained, with what weight,
# and when it rolls back. Its plain-JSON state goes into every checkpoint; the store holds the snapshots it names.

def run_sft(run: Run, store: msft.SnapshotStore, state: dict | None) -> tuple[dict, dict]:
    """The whole mixture for --max-epochs, evaluated every --interval (the base model first); the checkpoint with
    the best average is the chosen one."""
    if state is not None:
        msft.keep(run, store, state)
    state = state or msft.method_state()
    while not state["done"]:
        if state["evals"]:
            state["epoch"] = round(min(state["epoch"] + run.args.interval, run.sft_epochs), 9)
            run.train(run.tasks, 0.0, state["epoch"])
        events = [msft.score(run, run.tasks, state, 0, run.tasks)]
        if state["epoch"] >= run.sft_epochs - msft.EPS:
            state["done"] = True
            events.append({"event": "end", "stage": 0, "epoch": state["epoch"], "best_epoch": state["best"]["epoch"],
                           "best_avg": state["best"]["avg"]})
        msft.commit(run, store, state, events)
    return state["best"], state["model_at"]


def run_msft(run: Run, store: msft.SnapshotStore, state: dict | None) -> tuple[dict, dict]:
    """mSFT: msft.run_msft drives the run's primitives (Algorithm 1); this only wires them up."""
    a = run.args
    state = None if state is None else msft.LoopState.from_json(state)
    state = msft.run_msft(run.tasks, run, budget=a.budget, interval=a.interval, max_stages=a.max_stages,
                          max_epochs=a.max_epochs, store=store, ties=a.ties, eval_excluded=a.eval_excluded, state=state)
    return state.best, state.history[0]


# -----------------------------------------------------------------------------
# one run, from its start (or its last checkpoint) to the report

def train(args, model_dir: Path, data_dir: Path) -> dict:
    resume = runfolder.claim(args)  # the folder's lock; a finished or live run refused; fresh start or resume
    Runner = Run
    if args.fsdp:  # parameters, gradients and Adam states sharded over the ranks
        from fsdp import FSDPRun as Runner
    run = Runner(args, model_dir, data_dir)
    alone = args.method in ("msft", "sro", "continual")  # these come down to training one task at a time
    data.check_interval(run.sampler.sizes, args.interval, args.batch_size, alone)
    method = {"sft": run_sft, "msft": run_msft}.get(args.method)
    if method is None:  # a baseline: its sampler and hooks attached to the run
        import baselines
        method = baselines.attach(run)
    store = msft.SnapshotStore(run.out / "snapshots" / run.part if args.snapshots == "disk" else None,
                               holds=run.holds_snapshots)
    state = runfolder.load_state(run) if resume else runfolder.start(run)
    print0(f"{args.method}: {len(run.tasks)} tasks {run.tasks}, {sum(map(len, run.train_enc.values()))} training "
           f"examples (dropped as too long: {sum(run.dropped.values())}), {run.n_params / 1e6:.1f}M parameters, "
           f"world {run.world}, device {run.device}, precision {run.precision}, "
           f"compile {run.model.compiled is not None}")
    try:
        best, last = method(run, store, state)
    except Diverged as e:  # the last committed checkpoint into model/, and how to go on
        runfolder.diverged(run, e)
    return runfolder.report(run, store, best, last)  # the chosen and the final model scored on test, and saved


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.resume and args.out and (Path(args.out) / "args.json").is_file():  # the folder knows how it was started
        args = runfolder.resume_args(args, common.given(build_parser(), argv))
    if args.model is None and args.data is None:  # the built-in demo: its own mixture, model and flags
        import demo
        return demo.main(args, argv)
    if args.model is None or args.data is None:
        raise SystemExit("give both --model and --data (or neither, for the built-in demo)")
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: not a folder (make one with `python data.py prepare`)")
    args.method = args.method or "msft"
    args.out = args.out or f"runs/{args.method}"
    train(args, resolve_checkpoint(args.model), Path(args.data))
    common.cleanup()


if __name__ == "__main__":
    common.run(main)
