"""Fine-tune a language model on a mixture of tasks: SFT, mSFT or a baseline, on one process or many (DDP).

    python train.py                                   # built-in demo: tiny model, synthetic mixture, SFT vs mSFT
    python train.py --method msft --model DIR_OR_HUB_ID --data MIXTURE --out runs/msft
    torchrun --standalone --nproc_per_node=8 train.py --method msft --model Qwen/Qwen2.5-0.5B --data mix --out runs/q
    python train.py ... --resume                      # continue a killed run from its last completed evaluation
    python train.py --method sro --search-log runs/sft/log.jsonl ...   # baselines: continual sro soft-sro ies dynamix

A mixture folder comes from `python data.py prepare`. The run writes to --out: log.jsonl (one event a line, as it
happens), summary.json, model/ (the chosen checkpoint, loadable by transformers), snapshots/ and state/ (for resume).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import baselines
import data
import flops
import msft
from evaluate import evaluate
from model import ModelConfig, Transformer, resolve_checkpoint

METHODS = ("sft", "msft", "continual", "sro", "soft-sro", "ies", "dynamix")


# -----------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--method", choices=METHODS, default=None,
                   help="sft, msft, or a baseline of baselines.py (demo: sft and msft, one after the other)")
    p.add_argument("--model", default=None, help="checkpoint folder in hub layout, or a hub id (default: the demo's tiny model)")
    p.add_argument("--data", default=None, help="mixture folder from `python data.py prepare` (default: the demo mixture)")
    p.add_argument("--tasks", nargs="+", default=None, help="train on these tasks of the mixture only (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>, or runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed evaluation")
    # the algorithm (SPEC sections 3, 8)
    p.add_argument("--budget", type=float, default=1.0, help="mSFT compute budget C: epochs per roll-out")
    p.add_argument("--interval", type=float, default=0.25, help="evaluate every this many epochs")
    p.add_argument("--max-epochs", type=float, default=10.0, help="bound on cumulative epochs (SFT trains this long)")
    p.add_argument("--ties", choices=("all", "first"), default="all",
                   help="tasks peaking together at the earliest peak: exclude all, or only the first by name (official code)")
    p.add_argument("--signal", choices=("acc", "loss"), default="acc", help="score: accuracy, or minus the gold-answer loss (cheap)")
    p.add_argument("--eval-excluded", choices=("every", "rollback"), default="every",
                   help="evaluate excluded tasks at every checkpoint, or once at the roll-back (paper's FLOPs)")
    p.add_argument("--snapshots", choices=("disk", "memory"), default="disk",
                   help="where roll-back snapshots live (memory: faster, but a killed run cannot resume)")
    # the baselines (SPEC 5, baselines.py)
    p.add_argument("--task-order", nargs="+", default=None, help="continual: train the tasks in this order (default: by name)")
    p.add_argument("--search-log", default=None,
                   help="sro, soft-sro: log.jsonl of a finished SFT run (same model, tasks, --interval) as the search "
                        "phase; its FLOPs are counted (default: run the search first, --max-epochs long)")
    p.add_argument("--ies-threshold", type=float, default=1e-3,
                   help="ies: an example whose mean |second difference| of loss is under this is left out of backprop")
    p.add_argument("--ies-window", type=int, default=1,
                   help="ies: epochs that mean is over (1: an example can leave once it has 3 losses, as in Appendix F)")
    p.add_argument("--dynamix-every", type=int, default=0, help="dynamix: re-weight every N steps (0: 1%% of the run's steps)")
    p.add_argument("--dynamix-batch", type=int, default=8, help="dynamix: examples per task in each look-ahead")
    p.add_argument("--dynamix-beta", type=float, default=4.0, help="dynamix: sharpness of p ~ exp(beta Q) (paper: 4)")
    # optimisation (paper: lr 1e-5 constant, no warmup, Adam without weight decay, batch 64, seed 20)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=64, help="effective batch (examples per optimizer step, all ranks)")
    p.add_argument("--micro-batch", type=int, default=8, help="examples per forward pass on one rank")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off); 1.0 is HF Trainer's default")
    p.add_argument("--max-len", type=int, default=512, help="longer training examples are dropped and counted")
    p.add_argument("--seed", type=int, default=20)
    # evaluation
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N selection examples per task")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--select-on", choices=("selection", "test"), default="selection",
                   help="split that scores checkpoints; 'test' reproduces the official code (selects on test)")
    # system
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training forward (default: on for cuda)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast with fp32 master weights (default: on for cuda)")
    p.add_argument("--log-every", type=int, default=1, help="console line every N steps")
    args = p.parse_args(argv)
    checks = [
        (args.budget > 0, "--budget must be > 0"),
        (0 < args.interval <= args.budget, "--interval must be > 0 and no larger than --budget"),
        (args.max_epochs >= args.interval, "--max-epochs must be at least --interval"),
        (args.lr > 0, "--lr must be > 0"),
        (args.batch_size > 0 and args.micro_batch > 0, "--batch-size and --micro-batch must be > 0"),
        (args.max_len > 8, "--max-len must be > 8"),
        (args.eval_limit is None or args.eval_limit > 0, "--eval-limit must be > 0"),
        (args.shots >= 0, "--shots must be >= 0"),
        (args.task_order is None or args.method == "continual", "--task-order is for --method continual"),
        (args.search_log is None or args.method in ("sro", "soft-sro"), "--search-log is for --method sro or soft-sro"),
        (args.ies_threshold > 0, "--ies-threshold must be > 0"),
        (args.ies_window >= 1, "--ies-window must be >= 1"),
        (args.dynamix_every >= 0, "--dynamix-every must be >= 0"),
        (args.dynamix_batch >= 1, "--dynamix-batch must be >= 1"),
        (math.isfinite(args.dynamix_beta) and args.dynamix_beta >= 0, "--dynamix-beta must be a finite number >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args


# -----------------------------------------------------------------------------
# distributed setup: the one place that knows about ranks

def setup_distributed(device_flag=None):
    """(ddp, rank, local_rank, world_size, device); NCCL on GPUs, gloo on CPUs."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    kind = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=device if kind == "cuda" else None)
    return ddp, rank, local_rank, world, device


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def all_sum(x: float, device) -> float:
    if dist.is_initialized():
        t = torch.tensor(float(x), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item()
    return x


def example_losses(logits, targets):
    """(B,) each row's mean cross-entropy over its answer tokens; logits (B, T, vocab), targets (B, T), -100 off the
    answer. The per-example loss of IES and DynamixSFT (baselines.py)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none", ignore_index=-100)
    return ce.view(targets.shape).sum(1) / (targets != -100).sum(1).clamp(min=1)


def write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the run: model, data, optimizer and the primitives every method is written with

class Run:
    """Holds one training run and gives the methods (and msft.run_msft) its primitives: train the active mixture
    for some epochs, evaluate tasks, snapshot/restore parameters, log an event, checkpoint for resume."""

    def __init__(self, args, model_dir: Path, data_dir: Path):
        self.args = args
        self.ddp, self.rank, _, self.world, self.device = setup_distributed(args.device)
        cuda = self.device.type == "cuda"
        self.compile = cuda if args.compile is None else args.compile
        self.autocast = torch.autocast("cuda", torch.bfloat16) if (cuda if args.bf16 is None else args.bf16) else nullcontext()
        if args.batch_size % (self.world * args.micro_batch):
            raise SystemExit(f"--batch-size {args.batch_size} must be divisible by world size {self.world} x "
                             f"--micro-batch {args.micro_batch}")
        self.out = Path(args.out)
        torch.manual_seed(args.seed)

        # data: every training example tokenized once; too-long ones dropped and counted
        self.tok, self.eos = data.load_tokenizer(model_dir)
        self.mixture = data.load_mixture(data_dir, args.tasks)
        self.tasks = sorted(self.mixture)
        self.train_enc, self.dropped = {}, {}
        for t in self.tasks:
            enc = data.encode_examples(self.tok, self.eos, self.mixture[t]["train"], args.max_len)
            self.train_enc[t] = [e for e in enc if e is not None]
            self.dropped[t] = len(enc) - len(self.train_enc[t])
            if not self.train_enc[t]:
                raise SystemExit(f"{data_dir}/{t}: every training example is longer than --max-len {args.max_len}")
        # every rank draws the whole global batch and takes its micro-batches of it (train_step)
        self.sampler = data.MixtureSampler({t: len(e) for t, e in self.train_enc.items()}, args.batch_size, args.seed)

        # model: fp32 master weights; the uncompiled module is what is evaluated, snapshotted and saved
        self.model = Transformer.from_pretrained(model_dir, device=self.device)
        if self.tok.get_vocab_size() > self.model.config.vocab_size:
            raise SystemExit(f"{model_dir}: the tokenizer has {self.tok.get_vocab_size()} tokens but the model's "
                             f"vocabulary is {self.model.config.vocab_size}")
        self.pad = self.eos
        self.fwd = self.model
        if self.ddp:
            self.fwd = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None)
        if self.compile:
            self.fwd = torch.compile(self.fwd)
        self.new_optimizer()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.flops = flops.FlopCounter(self.n_params)
        self.step = 0
        self.tokens = 0
        self.t0 = time.time()
        self.log_file = None
        # hooks for the baselines (baselines.py): IES leaves the examples in `skip` out of backprop and collects
        # each example's loss in `example_loss` (task -> [[loss sum, count] per example]); DynamixSFT re-weights
        # the mixture in `on_step`, called before each optimizer step
        self.skip: set[tuple[str, int]] = set()
        self.example_loss: dict | None = None
        self.on_step = None

    def new_optimizer(self):
        # the official code starts the optimizer afresh at every stage; Adam without weight decay
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.args.lr, weight_decay=0.0,
                                     fused=self.device.type == "cuda")

    # --- logging -------------------------------------------------------------

    def open_log(self, keep_lines: int | None = None):
        path = self.out / "log.jsonl"
        if self.rank == 0:
            if keep_lines is not None:  # resume: drop what came after the last checkpoint; it will be redone
                lines = path.read_text().splitlines(keepends=True)[:keep_lines] if path.exists() else []
                path.write_text("".join(lines))
            self.log_file = open(path, "a")
        self.log_lines = keep_lines or 0

    def log(self, event: dict):
        event = {"event": event["event"], "step": self.step, **event}
        self.log_lines += 1
        if self.rank == 0:
            self.log_file.write(json.dumps(event) + "\n")
            self.log_file.flush()
            os.fsync(self.log_file.fileno())
        if event["event"] == "eval":
            scores = "  ".join(f"{t} {s:.3f}" for t, s in sorted(event["scores"].items()))
            print0(f"eval  stage {event.get('stage', '-')} epoch {event['epoch']:.2f} | avg {event['avg']:.4f} | {scores}")
        elif event["event"] == "decision":
            print0(f"decision stage {event['stage']}: {event['kind']} {event.get('excluded') or ''} "
                   f"roll back to epoch {event.get('rollback_epoch')}")

    # --- primitives ----------------------------------------------------------

    def train(self, active: list[str], epochs: float, weights: dict | None = None):
        """Optimizer steps over the active mixture until `epochs` more epochs of it are done."""
        self.sampler.set_active(active)
        self.sampler.set_weights(weights)
        target = self.sampler.epoch + epochs
        while self.sampler.epoch < target - 1e-9:
            self.train_step()

    def train_step(self):
        args = self.args
        if self.on_step is not None:
            self.on_step()
        batch = self.sampler.next_batch()
        measured = self.measure([x for x in batch if x in self.skip]) if self.skip else 0
        batch = [x for x in batch if x not in self.skip]
        t = time.time()
        if not batch:  # IES: every example of this batch is left out; no optimizer step
            self.log({"event": "train", "epoch": round(self.sampler.epoch, 6), "loss": None, "lr": args.lr,
                      "tokens": 0, "forward_tokens": int(measured)})
            return
        # the global batch sorted by length and cut into micro-batches, dealt round-robin to the ranks: every world
        # size computes the same micro-batches (so 1 and N ranks agree), and similar lengths pad little
        batch = sorted(batch, key=lambda x: len(self.train_enc[x[0]][x[1]][0]))
        enc = [self.train_enc[t][i] for t, i in batch]
        parts = [batch[i:i + args.micro_batch] for i in range(0, len(batch), args.micro_batch)][self.rank::self.world]
        # the loss is normalised by the answer tokens of the whole optimizer step, over all ranks (STYLE rule 8)
        n_ans = sum(sum(l != -100 for l in labels[1:]) for _, labels in enc)
        loss_sum, real, padded = 0.0, 0, 0
        if not parts:  # IES under DDP can leave fewer micro-batches than ranks: join the gradient all-reduce with 0
            with self.autocast:
                (self.fwd(data.collate(enc[:1], self.pad)[0].to(self.device)).sum() * 0).backward()
        for k, part in enumerate(parts):
            chunk = [self.train_enc[t][i] for t, i in part]
            idx, targets = data.collate(chunk, self.pad)
            idx, targets = idx.to(self.device), targets.to(self.device)
            sync = k == len(parts) - 1 or not self.ddp
            with (nullcontext() if sync else self.fwd.no_sync()), self.autocast:
                logits = self.fwd(idx)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), reduction="sum",
                                       ignore_index=-100)
            (loss * self.world / n_ans).backward()  # DDP averages over ranks; undo that to get a plain sum
            if self.example_loss is not None:
                self.record(part, logits, targets)
            loss_sum += loss.item()
            real += sum(len(ids) - 1 for ids, _ in chunk)
            padded += idx.numel()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        loss = all_sum(loss_sum, self.device) / n_ans
        if not math.isfinite(loss):
            self.log({"event": "error", "message": f"loss is {loss} at step {self.step + 1}"})
            raise SystemExit(f"stopping: the loss is {loss} at step {self.step + 1}; everything up to the last "
                             f"evaluation is in {self.out}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        real, padded = all_sum(real, self.device), all_sum(padded, self.device)
        self.tokens += real
        self.flops.train(real)
        dt = time.time() - t
        event = {"event": "train", "epoch": round(self.sampler.epoch, 6), "loss": loss, "lr": args.lr,
                 "tokens": int(real), "tok_per_s": real / dt, "real_frac": real / padded}
        if self.example_loss is not None:
            event["forward_tokens"] = int(measured)
        self.log(event)
        if self.step % args.log_every == 0:
            eta = (args.max_epochs - self.sampler.epoch) * (time.time() - self.t0) / max(self.sampler.epoch, 1e-9)
            print0(f"step {self.step:5d} | epoch {self.sampler.epoch:6.3f} | loss {loss:.4f} | "
                   f"{real / dt:8.0f} tok/s | real {real / padded:.0%} | eta <= {eta / 60:.1f} min")

    @torch.no_grad()
    def measure(self, items: list[tuple[str, int]]) -> int:
        """IES: the losses of examples left out of backprop, by a forward-only pass (2 N FLOPs a token), into
        example_loss; returns the tokens it took over all ranks. Micro-batches are dealt to ranks as in train_step."""
        parts = [items[i:i + self.args.micro_batch] for i in range(0, len(items), self.args.micro_batch)]
        real = 0
        for part in parts[self.rank::self.world]:
            idx, targets = data.collate([self.train_enc[t][i] for t, i in part], self.pad)
            with self.autocast:
                logits = self.model(idx.to(self.device))  # the plain module: no gradient, no DDP all-reduce
            self.record(part, logits, targets.to(self.device))
            real += sum(len(self.train_enc[t][i][0]) - 1 for t, i in part)
        real = all_sum(real, self.device)
        self.flops.forward(real)
        return real

    def record(self, items: list[tuple[str, int]], logits, targets):  # IES: into example_loss, as [sum, count]
        for (t, i), loss in zip(items, example_losses(logits.detach(), targets).tolist()):
            self.example_loss[t][i][0] += loss
            self.example_loss[t][i][1] += 1

    def lookahead(self, items: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """DynamixSFT's probe: each example's loss before and after one plain gradient step (the run's lr, no
        optimizer state) on `items`, then the parameters put back; (pre (B,), post (B,), tokens)."""
        params = list(self.model.parameters())
        saved = [p.detach().clone() for p in params]
        idx, targets = data.collate([self.train_enc[t][i] for t, i in items], self.pad)
        idx, targets = idx.to(self.device), targets.to(self.device)
        with self.autocast:
            pre = example_losses(self.model(idx), targets)
        n = (targets != -100).sum(1)
        ((pre * n).sum() / n.sum()).backward()  # the batch's loss over its answer tokens, as a training step's
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=self.args.lr)
            with self.autocast:
                post = example_losses(self.model(idx), targets)
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None
        return pre.detach(), post, sum(len(self.train_enc[t][i][0]) - 1 for t, i in items)

    def evaluate(self, tasks: list[str], split: str | None = None) -> dict[str, float]:
        a = self.args
        self.model.eval()
        with self.autocast:
            res = evaluate(self.model, self.tok, self.eos, self.mixture, sorted(tasks), split or a.select_on,
                           shots=a.shots, seed=a.seed, limit=a.eval_limit, batch_size=a.eval_batch,
                           max_new_tokens=a.max_new_tokens, signal=a.signal)
        self.model.train()
        self.flops.eval(sum(r["tokens"] for r in res.values()))
        self.last_eval = res
        return {t: (r["acc"] if a.signal == "acc" else -r["loss"]) for t, r in res.items()}

    def snapshot(self) -> dict:
        # rank 0 keeps the copies; the other ranks get theirs back by broadcast at restore
        if self.rank != 0:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if not (self.model.config.tie_embeddings and k == "lm_head.weight")}

    def restore(self, params: dict):
        with torch.no_grad():
            sd = self.model.state_dict()
            for k, v in sd.items():
                if self.rank == 0 and k in params:
                    v.copy_(params[k])
                if self.ddp:
                    dist.broadcast(v, 0)
        self.new_optimizer()

    def checkpoint(self, state):
        """Everything needed to continue after this evaluation. The tensors go to new files; state.json, replaced
        atomically, names them and is the commit point: a kill at any moment leaves the previous checkpoint whole."""
        if self.rank == 0:
            folder = self.out / "state"
            folder.mkdir(exist_ok=True)
            tag = time.time_ns()  # new names every time: the files state.json names are never overwritten
            opt = {}
            for i, p in enumerate(self.model.parameters()):
                for k, v in self.opt.state.get(p, {}).items():
                    opt[f"{i}.{k}"] = v.detach().cpu().reshape(-1) if v.dim() == 0 else v.detach().cpu()
            files = {"model": f"model-{tag}.safetensors", "optimizer": f"optimizer-{tag}.safetensors"}
            for name, tensors in (("model", self.snapshot()), ("optimizer", opt)):
                save_file(tensors, folder / (files[name] + ".tmp"))
                os.replace(folder / (files[name] + ".tmp"), folder / files[name])
            write_json(folder / "state.json", {
                "files": files, "loop": state.to_json() if hasattr(state, "to_json") else state,
                "sampler": self.sampler.state_dict(), "step": self.step, "tokens": self.tokens,
                "flops": self.flops.state_dict(), "log_lines": self.log_lines, "elapsed": time.time() - self.t0})
            for f in folder.iterdir():  # what the new state.json does not name is an older checkpoint
                if f.name != "state.json" and f.name not in files.values():
                    f.unlink()
        if self.ddp:
            dist.barrier()

    def load_checkpoint(self) -> dict:
        path = self.out / "state"
        s = json.loads((path / "state.json").read_text())
        self.restore(load_file(path / s["files"]["model"]))
        opt = load_file(path / s["files"]["optimizer"])
        for i, p in enumerate(self.model.parameters()):
            st = {k.split(".", 1)[1]: v.to(self.device) for k, v in opt.items() if k.split(".", 1)[0] == str(i)}
            if st:
                st["step"] = st["step"].reshape(())
                self.opt.state[p] = st
        self.sampler.load_state_dict(s["sampler"])
        self.step, self.tokens = s["step"], s["tokens"]
        self.flops.load_state_dict(s["flops"])
        self.t0 = time.time() - s["elapsed"]
        self.open_log(s["log_lines"])
        return s["loop"]


# -----------------------------------------------------------------------------
# the methods: each says which tasks are trained, with what weight, and when it rolls back

def run_sft(run: Run, store, state: dict | None) -> dict:
    """The whole mixture for max_epochs, evaluated every interval; the best average is the chosen checkpoint."""
    a, tasks = run.args, run.tasks
    if state is not None and run.rank != 0:  # rank 0 holds the best; the others keep an empty stand-in
        store.save(state["best"]["id"], {}, {})
    state = state or {"epoch": 0.0, "evals": 0, "best": None}
    while True:
        if state["evals"]:  # the base model is evaluated first, then every interval
            step = round(min(a.interval, a.max_epochs - state["epoch"]), 9)
            run.train(tasks, step)
            state["epoch"] = round(state["epoch"] + step, 9)
        scores = run.evaluate(tasks)
        avg = sum(scores.values()) / len(scores)
        if state["best"] is None or avg > state["best"]["avg"]:  # one copy: the best so far
            old, state["best"] = state["best"], {"id": state["evals"], "epoch": state["epoch"], "avg": avg}
            store.save(state["evals"], run.snapshot(), {"epoch": state["epoch"], "stage": 0, "scores": scores})
            if old is not None:
                store.drop(old["id"])
        state["evals"] += 1
        run.log({"event": "eval", "stage": 0, "epoch": state["epoch"], "active": tasks, "evaluated": tasks,
                 "scores": scores, "avg": avg, "snapshots_held": store.held})
        if state["epoch"] >= a.max_epochs - 1e-9:
            run.log({"event": "decision", "stage": 0, "kind": "done", "excluded": [], "rollback_epoch": None,
                     "epoch": state["epoch"], "best_epoch": state["best"]["epoch"], "best_avg": state["best"]["avg"]})
            run.checkpoint(state)
            return state["best"]
        run.checkpoint(state)


def run_msft_method(run: Run, store, state: dict | None) -> dict:
    """mSFT: msft.run_msft drives the run's primitives (Algorithm 1); this only wires them up."""
    a = run.args
    if state is not None:
        state = msft.LoopState.from_json(state)
        if run.rank != 0:  # rank 0 holds the snapshots; the others keep empty stand-ins for the bookkeeping
            for i in msft.needed(state.history, state.active, state.best["id"]) - {state.model_at}:
                store.save(i, {}, {})
    state = msft.run_msft(run.tasks, run, budget=a.budget, interval=a.interval, max_epochs=a.max_epochs,
                          store=store, ties=a.ties, eval_excluded=a.eval_excluded, state=state)
    return state.best


# -----------------------------------------------------------------------------
# one run from start (or resume) to summary

def train(args, model_dir: Path, data_dir: Path) -> dict:
    out = Path(args.out)
    if args.resume and not (out / "state" / "state.json").is_file():
        raise SystemExit(f"--resume: {out}/state/state.json not found (nothing to resume in {out})")
    if not args.resume and (out / "log.jsonl").exists():
        raise SystemExit(f"{out} already holds a run (log.jsonl): pass --resume to continue it, or choose another --out")
    if args.resume and args.snapshots == "memory":
        raise SystemExit("--resume: a run with --snapshots memory lost its snapshots with its process; "
                         "runs that must survive a kill use --snapshots disk")
    if args.resume:
        saved = json.loads((out / "args.json").read_text())
        diff = {k: (saved.get(k), v) for k, v in vars(args).items() if k not in ("resume", "log_every")
                and saved.get(k) != v}
        if diff:
            raise SystemExit(f"--resume with other arguments than the run in {out}: {diff} (saved, given)")
    run = Run(args, model_dir, data_dir)
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "args.json", vars(args))
    if run.ddp:
        dist.barrier()
    store = msft.SnapshotStore(out / "snapshots" if args.snapshots == "disk" and run.rank == 0 else None)
    state = None
    if args.resume:
        state = run.load_checkpoint()
    else:
        run.open_log()
    print0(f"{args.method}: {len(run.tasks)} tasks {run.tasks}, {sum(map(len, run.train_enc.values()))} training "
           f"examples (dropped as too long: {sum(run.dropped.values())}), {run.n_params / 1e6:.1f}M parameters, "
           f"world {run.world}, device {run.device}, compile {run.compile}")
    run_method = {"sft": run_sft, "msft": run_msft_method, "continual": baselines.run_continual,
                  "sro": baselines.run_sro, "soft-sro": baselines.run_soft_sro, "ies": baselines.run_ies,
                  "dynamix": baselines.run_dynamix}[args.method]
    best = run_method(run, store, state)
    # the chosen checkpoint: scored on the test split, saved for serving
    run.restore(store.load(best["id"]))
    scores = run.evaluate(run.tasks, split="test")
    final = {"event": "final", "best_epoch": best["epoch"], "best_avg": best["avg"], "scores": scores,
             "test_avg": sum(scores.values()) / len(scores), "flops": run.flops.report(),
             "peak_snapshots": store.peak_held}
    run.log(final)
    if run.rank == 0:
        run.model.save_pretrained(out / "model")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (model_dir / f).is_file():
                shutil.copy(model_dir / f, out / "model" / f)
        summary = {"args": vars(args), "method": args.method, "tasks": run.tasks, "best_epoch": best["epoch"],
                   "selection_avg": best["avg"], "test_scores": scores, "test_avg": final["test_avg"],
                   "flops": final["flops"], "peak_snapshots": store.peak_held, "steps": run.step,
                   "train_tokens": run.tokens, "dropped_too_long": run.dropped, "n_params": run.n_params,
                   "wall_time_s": time.time() - run.t0}
        write_json(out / "summary.json", summary)
        print0(f"done: best epoch {best['epoch']:.2f}, test avg {final['test_avg']:.4f}, "
               f"{final['flops']['total']:.3e} FLOPs -> {out}/summary.json, {out}/model")
    return final


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def demo_checkpoint(data_dir: Path) -> Path:
    """The demo's tiny model, seeded random weights, saved as a hub-layout checkpoint with the demo tokenizer."""
    folder = data_dir / "model"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        tok, _ = data.load_tokenizer(data_dir / "tokenizer")
        Transformer(ModelConfig(**{**data.DEMO_MODEL, "vocab_size": tok.get_vocab_size()})).save_pretrained(folder)
        for f in (data_dir / "tokenizer").glob("tokenizer*"):
            shutil.copy(f, folder / f.name)
    return folder


def demo(args):
    """The built-in demo: a tiny random model on a synthetic mixture whose tasks learn and overfit at different
    speeds; SFT and mSFT one after the other (or --method's), then their curves, exclusions and final table."""
    root = Path(args.out or "runs/demo")
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (several spin against each other)
    data_dir = data.make_demo(root / "data")
    # the demo's own settings, where the command line left the default
    default = vars(parse_args([]))
    for k, v in data.DEMO_ARGS.items():
        if getattr(args, k) == default[k]:
            setattr(args, k, v)
    results = {}
    for method in [args.method] if args.method else ["sft", "msft"]:
        a = argparse.Namespace(**vars(args))
        a.method, a.out = method, str(root / method)
        if not a.resume:
            shutil.rmtree(a.out, ignore_errors=True)
        results[method] = train(a, demo_checkpoint(data_dir), data_dir)
    if "sft" in results:  # the heterogeneous overfitting mSFT is for: every task peaks at its own epoch
        evals = [e for e in read_log(root / "sft" / "log.jsonl") if e["event"] == "eval"]
        print0("\nSFT selection scores by epoch (* = the task's peak):")
        tasks = sorted(evals[0]["scores"])
        print0("epoch  " + " ".join(f"{t[:10]:>10}" for t in tasks) + "        avg")
        peak = {t: max(evals, key=lambda e: e["scores"][t])["epoch"] for t in tasks}
        for e in evals:
            if float(e["epoch"]).is_integer() or e is evals[-1]:
                cells = [f"{e['scores'][t]:9.3f}{'*' if peak[t] == e['epoch'] else ' '}" for t in tasks]
                print0(f"{e['epoch']:5.2f}  " + " ".join(cells) + f" {e['avg']:10.3f}")
        print0("peak epoch per task: " + ", ".join(f"{t} {peak[t]:.2f}" for t in tasks))
    if "msft" in results:
        for e in read_log(root / "msft" / "log.jsonl"):
            if e["event"] == "decision" and e["kind"] == "drop":
                print0(f"mSFT stage {e['stage']}: excluded {', '.join(e['excluded'])}, rolled back to epoch "
                       f"{e['rollback_epoch']:.2f}")
    print0(f"\n| method | chosen epoch | selection avg | test avg | FLOPs |\n|---|---|---|---|---|")
    for m, r in results.items():
        print0(f"| {m} | {r['best_epoch']:.2f} | {r['best_avg']:.4f} | {r['test_avg']:.4f} | {r['flops']['total']:.3e} |")
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.model is None and args.data is None:
        return demo(args)
    if args.model is None or args.data is None:
        raise SystemExit("give both --model and --data (or neither, for the built-in demo)")
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: not a folder (make one with `python data.py prepare`)")
    args.method = args.method or "msft"
    args.out = args.out or f"runs/{args.method}"
    train(args, resolve_checkpoint(args.model), Path(args.data))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
