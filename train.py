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

import baselines
import cli
import data
import flops
import msft
import parallel
import runfolder
from evaluate import evaluate, load_demos
from model import ModelConfig, Transformer, example_losses, resolve_checkpoint
from parallel import print0

METHODS = ("sft", "msft", "continual", "sro", "soft-sro", "ies", "dynamix")


# -----------------------------------------------------------------------------
# arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    # what to train
    p.add_argument("--method", choices=METHODS, default=None,
                   help="sft, msft, or a baseline of baselines.py (demo: sft and msft, one after the other)")
    p.add_argument("--model", default=None, help="checkpoint folder in hub layout, or a hub id (default: the demo's tiny model)")
    p.add_argument("--data", default=None, help="mixture folder from `python data.py prepare` (default: the demo mixture)")
    p.add_argument("--tasks", nargs="+", default=None, help="train on these tasks of the mixture only (default: all)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<method>, or runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed evaluation")
    # the algorithm (SPEC sections 3, 9)
    p.add_argument("--budget", type=cli.number(float, above=0), default=3.0,
                   help="mSFT compute budget C: epochs per roll-out (Table 2: 3)")
    p.add_argument("--interval", type=cli.number(float, above=0), default=0.25,
                   help="evaluate every this many epochs of the active mixture")
    p.add_argument("--max-stages", type=cli.number(int, at_least=1), default=10,
                   help="mSFT stops after this many stages (the release: 10)")
    p.add_argument("--max-epochs", type=cli.number(float, above=0), default=None,
                   help="SFT and the baselines train this long (default 10); caps mSFT's cumulative epochs only when given")
    p.add_argument("--ties", choices=("first", "all"), default="first",
                   help="of the tasks peaking first together, exclude the first in the release's order (SPEC 9), or all")
    p.add_argument("--signal", choices=("acc", "loss"), default="acc", help="score: accuracy, or minus the gold-answer loss (cheap)")
    p.add_argument("--eval-excluded", choices=("every", "rollback"), default="every",
                   help="evaluate excluded tasks at every checkpoint (the release), or once at the roll-back (Appendix F)")
    p.add_argument("--snapshots", choices=("disk", "memory"), default="disk",
                   help="where roll-back snapshots live (memory: faster, but a killed run cannot resume)")
    # the baselines (SPEC 5, baselines.py)
    p.add_argument("--task-order", nargs="+", default=None, help="continual: train the tasks in this order (default: the paper's listing order, SPEC 7)")
    p.add_argument("--search-log", default=None,
                   help="sro, soft-sro: log.jsonl of a finished SFT run (same model, tasks, --interval) as the search "
                        "phase; its FLOPs are counted (default: run the search first, --max-epochs long)")
    p.add_argument("--ies-threshold", type=cli.number(float, above=0), default=1e-3,
                   help="ies: an example whose mean |second difference| of loss is under this is left out of backprop")
    p.add_argument("--ies-window", type=cli.number(int, at_least=1), default=3,
                   help="ies: epochs that mean is over (the reference code: 3; an example can leave after window + 3 "
                        "epochs at the earliest)")
    p.add_argument("--dynamix-every", type=cli.number(int, at_least=0), default=0,
                   help="dynamix: re-weight every N steps (0: 1%% of the run's steps)")
    p.add_argument("--dynamix-batch", type=cli.number(int, at_least=1), default=8,
                   help="dynamix: examples per task in each look-ahead")
    p.add_argument("--dynamix-beta", type=cli.number(float, at_least=0), default=4.0,
                   help="dynamix: sharpness of p ~ exp(beta Q) (paper: 4)")
    # optimisation (the release: Adam lr 1e-5 constant, no warmup, no weight decay, no clipping, batch 64, seed 20)
    p.add_argument("--lr", type=cli.number(float, above=0), default=1e-5, help="learning rate, constant")
    p.add_argument("--batch-size", type=cli.number(int, at_least=1), default=64,
                   help="examples per optimizer step, all ranks together (the last step of an epoch takes what is left)")
    p.add_argument("--micro-batch", type=cli.number(int, at_least=1), default=8,
                   help="at most this many examples per forward pass on one rank")
    p.add_argument("--loss-group", type=cli.number(int, at_least=0), default=4,
                   help="the step's loss is the mean over groups of this many examples (in sampling order) of each "
                        "group's token-mean loss, as the release's micro-batches of 4; 0: the token mean of the step")
    p.add_argument("--grad-clip", type=cli.number(float, at_least=0), default=0.0,
                   help="max gradient norm; 0: off (the release has none)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: fp32 weights and Adam states, bf16 autocast on GPUs; bf16: pure bf16 weights and Adam "
                        "states, no master copy (the release)")
    p.add_argument("--max-len", type=cli.number(int, above=8), default=512,
                   help="longer training examples are dropped and counted")
    p.add_argument("--seed", type=cli.number(int, at_least=0), default=20, help="seeds the data order and the shots")
    # evaluation
    p.add_argument("--shots", type=cli.number(int, at_least=0), default=5, help="worked examples before each question")
    p.add_argument("--demos", default=None,
                   help="JSON file {task: [{\"question\": ..., \"answer\": ...}, ...]}: these demonstrations (the "
                        "release's hand-picked ones) instead of --shots drawn from the training split")
    p.add_argument("--eval-limit", type=cli.number(int, at_least=1), default=None,
                   help="evaluate on the first N selection examples per task (default: all)")
    p.add_argument("--eval-batch", type=cli.number(int, at_least=1), default=32, help="questions decoded together")
    p.add_argument("--max-new-tokens", type=cli.number(int, at_least=1), default=512,
                   help="generation cap of the accuracy signal")
    p.add_argument("--select-on", choices=("selection", "test"), default="selection",
                   help="split that scores checkpoints; 'test' reproduces the release (selects on the reported data)")
    # output
    p.add_argument("--keep-state", action="store_true",
                   help="keep state/ and snapshots/ when the run finishes (by default only model/ and the logs stay)")
    p.add_argument("--save-final", action="store_true",
                   help="also save the model the method ended with in final-model/ (model/ is the global best)")
    p.add_argument("--save-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the saved model/ (auto: the source checkpoint's)")
    # system
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and Adam states over the ranks (FSDP2), for models that do "
                        "not fit whole on one GPU")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in the backward pass")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block for training (default: on for cuda)")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                   help="with --precision fp32: bf16 autocast (default: on for cuda)")
    p.add_argument("--log-every", type=cli.number(int, at_least=1), default=None,
                   help="a console line every N steps (default: one every 15 seconds); log.jsonl has every step")
    p.add_argument("--quiet", action="store_true", help="console: only decisions and the end (the demo's choice)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    checks = [
        (args.interval <= args.budget, "--interval must be no larger than --budget"),
        (args.max_epochs is None or args.max_epochs >= args.interval, "--max-epochs must be at least --interval"),
        (args.task_order is None or args.method == "continual", "--task-order is for --method continual"),
        (args.search_log is None or args.method in ("sro", "soft-sro"), "--search-log is for --method sro or soft-sro"),
        (not (args.fsdp and args.method == "dynamix"), "--fsdp does not support --method dynamix yet (its look-ahead "
                                                       "deals tasks to ranks): run it without --fsdp"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args


def given_flags(argv) -> set[str]:
    """The destinations of the flags the command line names, even where it gives the default value."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


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


# -----------------------------------------------------------------------------
# the run: model, data, optimizer and the primitives every method is written with

class Run:
    """Holds one training run and gives the methods (and msft.run_msft) its primitives: train the active mixture
    up to an epoch, evaluate tasks, snapshot/restore parameters, log an event, checkpoint for resume."""

    def __init__(self, args, model_dir: Path, data_dir: Path):
        self.args = args
        self.ddp, self.rank, _, self.world, self.device = parallel.setup(args.device)
        cuda = self.device.type == "cuda"
        self.compile = cuda if args.compile is None else args.compile
        self.fsdp = args.fsdp
        self.holds_snapshots = self.fsdp or self.rank == 0  # FSDP: every rank its shard; else rank 0 whole copies
        # pure bf16 computes in bf16 anyway; fp32 weights compute in bf16 (on GPUs by default): under autocast, or
        # under FSDP by its mixed precision (bf16 copies of the gathered blocks, fp32 gradient reduction)
        bf16_compute = args.precision == "fp32" and (cuda if args.autocast is None else args.autocast)
        use_autocast = bf16_compute and not self.fsdp
        self.autocast = torch.autocast(self.device.type, torch.bfloat16) if use_autocast else nullcontext()
        self.out = Path(args.out)
        self.sft_epochs = msft.SFT_EPOCHS if args.max_epochs is None else args.max_epochs  # SFT's length, the baselines'
        torch.manual_seed(args.seed)

        # data: every training example tokenized once; too-long ones dropped and counted
        self.tok, self.eos = data.load_tokenizer(model_dir)
        self.mixture = data.load_mixture(data_dir, args.tasks)
        self.tasks = sorted(self.mixture)
        self.demos = None if args.demos is None else load_demos(args.demos, self.tasks)
        self.train_enc, self.dropped = {}, {}
        for t in self.tasks:
            enc = data.encode_examples(self.tok, self.eos, self.mixture[t]["train"], args.max_len)
            self.train_enc[t] = [e for e in enc if e is not None]
            self.dropped[t] = len(enc) - len(self.train_enc[t])
            if not self.train_enc[t]:
                raise SystemExit(f"{data_dir}/{t}: every training example is longer than --max-len {args.max_len}")
        # every rank draws the whole global batch and takes its micro-batches of it (train_step)
        self.sampler = data.MixtureSampler({t: len(e) for t, e in self.train_enc.items()}, args.batch_size, args.seed)
        self.segment = None  # [active tasks, origin epoch, examples trained since the origin] (train)
        self.epoch = 0.0     # epochs trained on the path to the model as it is, summed over segments

        # model: the module (its blocks compiled for training) is what is evaluated, snapshotted and saved
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        shard = None
        if self.fsdp:
            shard = lambda m: parallel.shard(m, param_dtype=torch.bfloat16 if bf16_compute else None,
                                             reduce_dtype=dtype)
        self.model = Transformer.from_pretrained(model_dir, device=self.device, dtype=dtype, prepare=shard)
        self.save_dtype = runfolder.source_dtype(model_dir) if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
        if self.tok.get_vocab_size() > self.model.config.vocab_size:
            raise SystemExit(f"{model_dir}: the tokenizer has {self.tok.get_vocab_size()} tokens but the model's "
                             f"vocabulary is {self.model.config.vocab_size}")
        self.pad = self.eos
        for block in self.model.layers:
            block.checkpointing = args.activation_checkpointing
        if self.compile:
            self.model.compile_blocks()
        self.fwd = self.model
        if self.ddp and not self.fsdp:
            self.fwd = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None)
        self.new_optimizer()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.flops = flops.FlopCounter(self.n_params)
        self.paper_last, self.excluded = {}, []  # Appendix F's count: each task's latest evaluation, mSFT's excluded
        self.step = 0
        self.tokens = 0
        self.t0 = time.time()
        self.log_file = None
        self.model_dir = model_dir
        self.fingerprint = runfolder.fingerprint(data_dir, self.tasks, model_dir)
        # the console: a line every --log-every steps or 15 s, its ETA from this process's own training and
        # evaluation rates (seconds an epoch, seconds an evaluation)
        self.printed, self.epoch_seconds, self.eval_seconds, self.eval_started = time.time(), None, None, time.time()
        # hooks for the baselines (baselines.py): IES collects each example's loss in `example_loss` (task ->
        # [[loss sum, token count] per example]); DynamixSFT re-weights the mixture in `on_step`, called before
        # each optimizer step
        self.example_loss: dict | None = None
        self.on_step = None

    def new_optimizer(self):
        # the release starts Adam afresh at every stage: lr constant, default betas and eps, no weight decay. Its
        # moments take the parameters' dtype: bf16 under --precision bf16, as the release's
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.args.lr, fused=self.device.type == "cuda")

    # --- logging -------------------------------------------------------------

    def open_log(self, keep_lines: int | None = None):
        path = self.out / "log.jsonl"
        if self.rank == 0:
            if keep_lines is not None:  # resume: drop what came after the last checkpoint; it will be redone
                lines = path.read_text().splitlines(keepends=True) if path.exists() else []
                if len(lines) < keep_lines:
                    raise SystemExit(f"--resume: {path} has {len(lines)} lines but the checkpoint in {self.out}/state "
                                     f"was taken after {keep_lines}: the log is not this run's, or was cut")
                runfolder.write_text(path, "".join(lines[:keep_lines]))  # whole or not at all, as every rewrite here
            self.log_file = open(path, "a")
        self.log_lines = keep_lines or 0

    def log(self, event: dict):
        event = {"event": event["event"], "step": self.step, "time": round(time.time(), 3), **event}
        if event["event"] == "eval":  # its cost, both ways (flops.py)
            event["eval_tokens"] = sum(r["tokens"] for r in self.last_eval.values())
            event["paper_tokens"] = {t: r["paper_tokens"] for t, r in self.last_eval.items()}
            self.paper_last.update(event["paper_tokens"])
            # Appendix F counts mSFT's evaluation of the active tasks at every checkpoint, of the excluded ones once a
            # stage (below); the other methods' of every task evaluated
            counted = event["active"] if self.args.method == "msft" else event["evaluated"]
            self.flops.add("paper_eval", sum(event["paper_tokens"].get(t, 0) for t in counted))
        elif event["event"] == "decision" and self.args.method == "msft" and event["kind"] in ("drop", "no_drop"):
            self.excluded += event["excluded"]
            self.flops.add("paper_eval", sum(self.paper_last[t] for t in self.excluded))
        if "flops" in event:  # a method's last decision: its cost with the evaluation logged just before it
            event["flops"], event["flop_tokens"] = self.flops.report(), dict(self.flops.tokens)
        self.log_lines += 1
        if self.rank == 0:
            self.log_file.write(json.dumps(event) + "\n")
            self.log_file.flush()
            os.fsync(self.log_file.fileno())
        if event["event"] == "eval":
            self.eval_seconds = time.time() - self.eval_started
            if not self.args.quiet:
                scores = "  ".join(f"{t} {s:.3f}" for t, s in sorted(event["scores"].items()))
                print0(f"eval  stage {event.get('stage', '-')} epoch {event['epoch']:.2f} | avg {event['avg']:.4f} | "
                       f"{scores} | {self.eval_seconds:.0f} s")
        elif event["event"] == "decision":
            print0(f"decision stage {event['stage']}: {event['kind']} {event.get('excluded') or ''} "
                   f"roll back to epoch {event.get('rollback_epoch')}")

    # --- primitives ----------------------------------------------------------

    def train(self, active: list[str], origin: float, until: float, weights: dict | None = None):
        """Optimizer steps over the active mixture up to the step nearest epoch `until`. Epochs are counted from
        `origin`, the epoch where these tasks began to be trained together (the run's or a stage's start, an
        exclusion): the boundary is (until - origin) x this mixture's examples after it, so the rounding to whole
        steps never accumulates, and an epoch's last step (smaller) ends exactly on the epoch."""
        active = sorted(active)
        if self.segment is None or self.segment[:2] != [active, origin]:
            self.sampler.set_active(active)  # a new set of tasks starts a new pass; the same set goes on with its own
            self.segment, self.epoch = [active, origin, 0], origin
        self.sampler.set_weights(weights)
        target = round((until - origin) * self.sampler.size)
        while self.segment[2] + self.sampler.next_size() / 2 <= target:  # the step nearest the boundary
            self.train_step()

    def train_step(self):
        a = self.args
        if self.on_step is not None:
            self.on_step()
        if self.segment is None:  # a step outside train(): the active tasks from where the model is
            self.segment = [list(self.sampler.active), self.epoch, 0]
        batch = self.sampler.next_batch()  # the global batch, in sampling order
        enc = [self.train_enc[t][i] for t, i in batch]
        n_answer = [sum(label != -100 for label in labels[1:]) for _, labels in enc]
        weight = loss_weights(n_answer, a.loss_group)
        # sorted by length and cut into micro-batches dealt to the ranks: any world size and --micro-batch computes
        # the same sum, and similar lengths pad little
        order = sorted(range(len(batch)), key=lambda j: len(enc[j][0]))
        parts = [[order[j] for j in part] for part in data.micro_batches(len(batch), self.world, a.micro_batch)[self.rank]]
        t = time.time()
        loss_sum, real, padded = 0.0, 0, 0
        by_task = torch.zeros(len(self.tasks), 2, dtype=torch.float64)  # per task: summed token loss, tokens
        for k, part in enumerate(parts):
            sync = k == len(parts) - 1 or self.fwd is self.model  # DDP all-reduces once, after the last; FSDP every time
            # a rank with no example left in this step still joins the collectives, with a loss of zero
            rows = [enc[j] for j in part] or enc[:1]
            idx, targets = (x.to(self.device) for x in data.collate(rows, self.pad))
            with (nullcontext() if sync else self.fwd.no_sync()), self.autocast:
                losses = example_losses(self.fwd(idx), targets)  # (B,) summed over each row's answer tokens
                w = torch.tensor([weight[j] for j in part] or [0.0], device=self.device)
                loss = (losses * w).sum()
            (loss * self.world).backward()  # DDP and FSDP average over ranks; undo that to get a plain sum
            if not part:
                continue
            loss_sum += loss.item()
            real += sum(len(ids) - 1 for ids, _ in rows)
            padded += idx.numel()
            for j, l in zip(part, losses.detach().tolist()):
                task, i = batch[j]
                by_task[self.tasks.index(task)] += torch.tensor([l, n_answer[j]], dtype=torch.float64)
                if self.example_loss is not None:  # IES: each example's mean token loss
                    self.example_loss[task][i][0] += l / n_answer[j]
                    self.example_loss[task][i][1] += 1
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        loss = parallel.all_sum(loss_sum, self.device)
        if not math.isfinite(loss):
            self.log({"event": "error", "message": f"loss is {loss} at step {self.step + 1}"})
            epoch = runfolder.export_last_good(self)
            raise SystemExit(f"stopping: the loss is {loss} at step {self.step + 1}. The last good checkpoint "
                             f"(epoch {epoch:.2f}) is in {self.out}/model; continue from it with a smaller "
                             f"learning rate: the same command with --resume --lr {self.args.lr / 10:g}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        real, padded = parallel.all_sum(real, self.device), parallel.all_sum(padded, self.device)
        if dist.is_initialized():
            by_task = by_task.to(self.device)
            dist.all_reduce(by_task)
        self.tokens += real
        self.flops.train(real)
        self.segment[2] += len(batch)
        self.epoch = self.segment[1] + self.segment[2] / self.sampler.size
        dt = time.time() - t
        task_loss = {task: s / n for task, (s, n) in zip(self.tasks, by_task.tolist()) if n}
        self.log({"event": "train", "epoch": round(self.epoch, 6), "examples": len(batch), "loss": loss,
                  "task_loss": task_loss, "lr": a.lr, "tokens": int(real), "tok_per_s": real / dt,
                  "real_frac": real / padded})
        rate = dt * self.sampler.size / len(batch)  # seconds an epoch at this step's pace; averaged below
        self.epoch_seconds = rate if self.epoch_seconds is None else 0.9 * self.epoch_seconds + 0.1 * rate
        due = self.step % a.log_every == 0 if a.log_every else time.time() - self.printed >= 15
        if due and not a.quiet:
            self.printed = time.time()
            print0(f"step {self.step:6d} | epoch {self.epoch:7.3f} | loss {loss:.4f} | {real / dt:8.0f} tok/s | "
                   f"{self.eta()}")

    def eta(self) -> str:
        """Time left to the end of this stage (mSFT, continual SFT) or run: its epochs at the training pace so far,
        and its evaluations at the last one's pace."""
        a, origin = self.args, self.segment[1]
        stage = a.method in ("msft", "continual")
        end = min(origin + a.budget, a.max_epochs or math.inf) if stage else self.sft_epochs
        left = max(end - self.epoch, 0.0)
        seconds = left * self.epoch_seconds + math.ceil(left / a.interval - 1e-9) * (self.eval_seconds or 0.0)
        return f"{'stage' if stage else 'run'} ends in {seconds / 60:5.1f} min"

    def evaluate(self, tasks: list[str], split: str | None = None, final: bool = False) -> dict[str, float]:
        """Scores of `tasks` (accuracy, or minus the gold-answer loss) on --select-on's split or `split`. A final
        evaluation (the report on the test split) is counted apart from the method's FLOPs."""
        a = self.args
        self.eval_started = time.time()
        self.model.eval()
        with self.autocast, parallel.gathered(self.model, self.fsdp):
            res = evaluate(self.model, self.tok, self.eos, self.mixture, sorted(tasks), split or a.select_on,
                           shots=a.shots, seed=a.seed, demos=self.demos, limit=a.eval_limit, batch_size=a.eval_batch,
                           max_new_tokens=a.max_new_tokens, signal=a.signal)
        self.model.train()
        self.flops.add("test" if final else "eval", sum(r["tokens"] for r in res.values()))
        if final:
            self.flops.add("paper_test", sum(r["paper_tokens"] for r in res.values()))
        self.last_eval = res
        return {t: (r["acc"] if a.signal == "acc" else -r["loss"]) for t, r in res.items()}

    def snapshot(self) -> dict:
        """The parameters on the CPU: under FSDP this rank's shard of each; otherwise rank 0 keeps whole copies and
        the other ranks nothing (restore broadcasts them)."""
        if not self.holds_snapshots:
            return {}
        return {k: parallel.local(v).detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if not (self.model.config.tie_embeddings and k == "lm_head.weight")}

    def restore(self, params: dict):
        """Parameters back to a checkpoint's, a fresh optimizer, and training from there starts a new segment.
        Under FSDP each rank copies its own shard back: no rank gathers or sends anything."""
        self.segment = None
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if self.holds_snapshots and k in params:
                    parallel.local(v).copy_(params[k])
                if self.ddp and not self.fsdp:
                    dist.broadcast(v, 0)
        self.new_optimizer()

    def checkpoint(self, state):
        """Everything needed to continue after this evaluation (runfolder.save_state); msft.run_msft's hook."""
        runfolder.save_state(self, state)

# -----------------------------------------------------------------------------
# the methods: each says which tasks are trained, with what weight, and when it rolls back. Each returns the global
# best and the checkpoint the model ends with ({"id", "epoch", ...}); the store holds the best's parameters.

def run_sft(run: Run, store, state: dict | None) -> tuple[dict, dict]:
    """The whole mixture for --max-epochs, evaluated every interval; the best average is the chosen checkpoint."""
    a, tasks, end = run.args, run.tasks, run.sft_epochs
    if state is not None and not run.holds_snapshots:  # rank 0 holds the best; the others an empty stand-in
        store.save(state["best"]["id"], {}, {})
    state = state or {"epoch": 0.0, "evals": 0, "best": None}
    while True:
        if state["evals"]:  # the base model is evaluated first, then every interval
            state["epoch"] = round(min(state["epoch"] + a.interval, end), 9)
            run.train(tasks, 0.0, state["epoch"])
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
        if state["epoch"] >= end - 1e-9:
            run.log({"event": "decision", "stage": 0, "kind": "done", "excluded": [], "rollback_epoch": None,
                     "epoch": state["epoch"], "best_epoch": state["best"]["epoch"], "best_avg": state["best"]["avg"]})
            run.checkpoint(state)
            return state["best"], {"id": state["evals"] - 1, "epoch": state["epoch"]}
        run.checkpoint(state)


def run_msft_method(run: Run, store, state: dict | None) -> tuple[dict, dict]:
    """mSFT: msft.run_msft drives the run's primitives (Algorithm 1); this only wires them up."""
    a = run.args
    if state is not None:
        state = msft.LoopState.from_json(state)
        if not run.holds_snapshots:  # rank 0 holds the snapshots; the others keep empty stand-ins
            for i in msft.needed(state.history, state.active, state.best["id"]) - {state.model_at}:
                store.save(i, {}, {})
    # the release's order for its ten tasks; a user's own tasks come after them, by name
    state = msft.run_msft(run.tasks, run, budget=a.budget, interval=a.interval, max_stages=a.max_stages,
                          max_epochs=a.max_epochs, store=store, ties=a.ties, order=msft.RELEASE_ORDER,
                          eval_excluded=a.eval_excluded, state=state)
    return state.best, state.history[0]


def check_interval(run: Run):
    """Refuse, at start-up, an interval that is less than one batch of the smallest mixture the method trains."""
    a, sizes = run.args, run.sampler.sizes
    alone = a.method in ("msft", "sro", "continual")  # these come down to one task at a time
    task = min(sizes, key=sizes.get) if alone else None
    n = sizes[task] if alone else sum(sizes.values())
    per_interval = a.interval * n
    if per_interval < a.batch_size:
        what = f"task {task} alone ({n} training examples)" if alone else f"the mixture ({n} training examples)"
        raise SystemExit(f"--interval {a.interval} of {what} is {per_interval:g} examples, less than one --batch-size "
                         f"{a.batch_size}: use --batch-size {max(1, math.floor(per_interval))} or less, or --interval "
                         f"{a.batch_size / n:.3g} or more")


# -----------------------------------------------------------------------------
# one run from start (or resume) to summary

def train(args, model_dir: Path, data_dir: Path) -> dict:
    out = Path(args.out)
    if parallel.rank() == 0:
        runfolder.lock_folder(out)  # one writer per run folder, held until this process ends
    state_json = out / "state" / "state.json"
    if (out / "summary.json").is_file():
        raise SystemExit(f"{out} holds a finished run (summary.json): choose another --out, or remove it")
    if args.resume and args.snapshots == "memory":
        raise SystemExit("--resume: a run with --snapshots memory lost its snapshots with its process; "
                         "runs that must survive a kill use --snapshots disk")
    if not args.resume and state_json.is_file():
        raise SystemExit(f"{out} holds a run that can continue: pass --resume to continue it, or choose another --out")
    _, _, _, world, device = parallel.setup(args.device)
    if args.resume and parallel.all_sum(state_json.is_file(), device) not in (0, world):
        raise SystemExit(f"--resume: {state_json} is there for some ranks only: --out must be on a filesystem "
                         f"every node sees to resume (README, multi-node)")
    if args.resume and not state_json.is_file():
        print0(f"--resume: {out} has no committed checkpoint (killed before its first evaluation ended): "
               "starting it afresh")
        args.resume = False
    if args.resume:
        saved = json.loads((out / "args.json").read_text())
        diff = {k: (saved.get(k), v) for k, v in vars(args).items()
                if k not in ("resume", "log_every", "quiet", "lr") and saved.get(k) != v}
        if diff:
            raise SystemExit(f"--resume with other arguments than the run in {out}: {diff} (saved, given); "
                             f"only --lr may change")
    elif parallel.rank() == 0:  # a fresh start: whatever a run killed before its first checkpoint left goes
        runfolder.clear_folder(out)
    parallel.barrier()
    run = Run(args, model_dir, data_dir)
    check_interval(run)
    disk = args.snapshots == "disk" and run.holds_snapshots
    store = msft.SnapshotStore(out / "snapshots" if disk else None, part=(run.rank, run.world) if run.fsdp else None)
    state = None
    if args.resume:
        lr = saved["lr"]
        state = runfolder.load_state(run)
        if lr != args.lr:
            run.log({"event": "change", "lr": [lr, args.lr], "epoch": run.epoch})
    else:
        run.open_log()
    if run.rank == 0:
        runfolder.write_json(out / "args.json", vars(args))
    print0(f"{args.method}: {len(run.tasks)} tasks {run.tasks}, {sum(map(len, run.train_enc.values()))} training "
           f"examples (dropped as too long: {sum(run.dropped.values())}), {run.n_params / 1e6:.1f}M parameters, "
           f"world {run.world}, device {run.device}, precision {args.precision}, compile {run.compile}")
    run_method = {"sft": run_sft, "msft": run_msft_method, "continual": baselines.run_continual,
                  "sro": baselines.run_sro, "soft-sro": baselines.run_soft_sro, "ies": baselines.run_ies,
                  "dynamix": baselines.run_dynamix}[args.method]
    best, last = run_method(run, store, state)
    # the report (SPEC 3): the global best and the final model, each scored on the test split
    final_scores = run.evaluate(run.tasks, split="test", final=True)
    if args.save_final:
        runfolder.save_model(run, model_dir, out / "final-model")
    if best["id"] != last["id"]:
        run.restore(store.load(best["id"]))
        scores = run.evaluate(run.tasks, split="test", final=True)
    else:
        scores = final_scores
    mean = lambda s: sum(s.values()) / len(s)
    final = {"event": "final", "best_epoch": best["epoch"], "best_avg": best["avg"], "scores": scores,
             "test_avg": mean(scores), "final_epoch": last["epoch"], "final_scores": final_scores,
             "final_test_avg": mean(final_scores), "flops": run.flops.report(), "peak_snapshots": store.peak_held}
    run.log(final)
    runfolder.save_model(run, model_dir, out / "model")
    parallel.barrier()
    if run.rank == 0:
        summary = {"args": vars(args), "method": args.method, "tasks": run.tasks, "best_epoch": best["epoch"],
                   **({"best_mixture_epoch": best["mixture_epoch"]} if "mixture_epoch" in best else {}),
                   "selection_avg": best["avg"], "test_scores": scores, "test_avg": final["test_avg"],
                   "final_epoch": last["epoch"], "final_test_scores": final_scores,
                   "final_test_avg": final["final_test_avg"], "flops": final["flops"],
                   "peak_snapshots": store.peak_held, "steps": run.step, "train_tokens": run.tokens,
                   "dropped_too_long": run.dropped, "n_params": run.n_params, "wall_time_s": time.time() - run.t0}
        runfolder.write_json(out / "summary.json", summary)  # the run is finished from here on
        if not args.keep_state:  # the resume state and the snapshots: model/ holds what the run chose
            for folder in ("state", "snapshots"):
                shutil.rmtree(out / folder, ignore_errors=True)
        print0(f"done: best epoch {best['epoch']:.2f}, test avg {final['test_avg']:.4f} (final model, epoch "
               f"{last['epoch']:.2f}: {final['final_test_avg']:.4f}), {final['flops']['total']:.3e} FLOPs -> "
               f"{out}/summary.json, {out}/model")
    return final


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


def demo(args, given: set[str]):
    """The built-in demo: a tiny random model on a synthetic mixture whose tasks learn and overfit at different
    speeds; SFT and mSFT one after the other (or --method's), then their curves, exclusions and final table."""
    root = Path(args.out or "runs/demo")
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (several spin against each other)
    parallel.setup(args.device)
    data_dir = root / "data"
    if parallel.rank() == 0:  # one writer; the other ranks wait for the files
        data.make_demo(data_dir)
        demo_checkpoint(data_dir)
    parallel.barrier()
    for k, v in {**data.DEMO_ARGS, "quiet": True}.items():  # the demo's own settings, where the command line gave none
        if k not in given:
            setattr(args, k, v)
    results = {}
    for method in [args.method] if args.method else ["sft", "msft"]:
        a = argparse.Namespace(**vars(args))
        a.method, a.out = method, str(root / method)
        if not a.resume and parallel.rank() == 0:  # the demo starts afresh, but never under a live run
            runfolder.lock_folder(Path(a.out))
            runfolder.clear_folder(Path(a.out))
        parallel.barrier()
        results[method] = train(a, data_dir / "model", data_dir)
    if "sft" in results:  # the heterogeneous overfitting mSFT is for: every task peaks at its own epoch
        evals = [e for e in data.read_jsonl(root / "sft" / "log.jsonl") if e["event"] == "eval"]
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
        for e in data.read_jsonl(root / "msft" / "log.jsonl"):
            if e["event"] == "decision" and e["kind"] == "drop":
                print0(f"mSFT stage {e['stage']}: excluded {', '.join(e['excluded'])}, rolled back to epoch "
                       f"{e['rollback_epoch']:.2f}")
    print0("\n| method | chosen epoch | selection avg | test avg | FLOPs |\n|---|---|---|---|---|")
    for m, r in results.items():
        print0(f"| {m} | {r['best_epoch']:.2f} | {r['best_avg']:.4f} | {r['test_avg']:.4f} | {r['flops']['total']:.3e} |")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.model is None and args.data is None:
        results = demo(args, given_flags(argv))
        parallel.cleanup()
        return results
    if args.model is None or args.data is None:
        raise SystemExit("give both --model and --data (or neither, for the built-in demo)")
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: not a folder (make one with `python data.py prepare`)")
    args.method = args.method or "msft"
    args.out = args.out or f"runs/{args.method}"
    train(args, resolve_checkpoint(args.model), Path(args.data))
    parallel.cleanup()


if __name__ == "__main__":
    cli.run(main)
