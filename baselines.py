"""The baselines mSFT is compared with (docs/baselines.md), each one function over train.py's Run, with their flags.

    python train.py --method continual --model DIR --data MIXTURE --out runs/continual
    python train.py --method sro --model DIR --data MIXTURE --out runs/sro --search-log runs/sft/log.jsonl
    python train.py --method soft-sro --model DIR --data MIXTURE --out runs/soft-sro    # runs its own search first
    python train.py --method ies --model DIR --data MIXTURE --out runs/ies
    python train.py --method dynamix --model DIR --data MIXTURE --out runs/dynamix

train.py plugs this module in at three lines: add_flags (the flags below), flag_checks, and attach(run), which gives
the run this module's sampler (skipped examples for IES, task weights for Soft SRO and DynamixSFT) and returns the
method. Every method is `run_x(run, store, state) -> (best, last)`, like train.run_sft: it says which tasks or
examples are trained, with what weight, and when it rolls back; Run trains, evaluates, snapshots, logs and counts
FLOPs for all of them. Each evaluates every task every --interval, keeps the checkpoint with the best average over
all tasks (scored on test by runfolder.report) and commits its plain-JSON state after every evaluation
(msft.commit), so a killed run resumes from there.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import common
import data
import msft
import prepare

EPS = msft.EPS
ALPHA, GAMMA = 0.95, 0.3  # DynamixSFT: smoothing of Q, and the share of uniform exploration in p (docs/baselines.md)


def add_flags(p):
    number = common.number
    p.add_argument("--task-order", nargs="+", default=None,
                   help="continual: train the tasks in this order (default: the paper's listing order)")
    p.add_argument("--search-log", default=None,
                   help="sro, soft-sro: log.jsonl of a finished SFT run (same model, tasks, --interval) as the search "
                        "phase; its FLOPs are counted (default: run the search first, --max-epochs long)")
    p.add_argument("--ies-rule", choices=("paper", "reference"), default="paper",
                   help="ies: paper: the mSFT paper's IES (Appendix F): the last second difference of an example's "
                        "losses, the base model's the first, so examples leave from the 3rd epoch on; reference: IES's "
                        "own code, the mean over --ies-window second differences, from epoch window + 4 on")
    p.add_argument("--ies-threshold", type=number(float, above=0), default=1e-3,
                   help="ies: an example whose |second difference| of loss is under this is left out of backprop")
    p.add_argument("--ies-window", type=number(int, at_least=1), default=3,
                   help="ies --ies-rule reference: second differences averaged (IES's code: 3)")
    p.add_argument("--dynamix-every", type=number(int, at_least=0), default=0,
                   help="dynamix: re-weight every N steps (0: 1%% of the run's steps)")
    p.add_argument("--dynamix-batch", type=number(int, at_least=1), default=128,
                   help="dynamix: examples a task in each look-ahead (128: it costs what the mSFT paper's Appendix F "
                        "says, 95%% of training FLOPs on its mixture)")
    p.add_argument("--dynamix-beta", type=number(float, at_least=0), default=4.0,
                   help="dynamix: sharpness of p ~ exp(beta Q): DynamixSFT's paper uses 4 (or 5); the mSFT paper "
                        "re-tuned it, to a value its text as we have it does not show")


def flag_checks(args) -> list[tuple[bool, str]]:
    return [(args.task_order is None or args.method == "continual", "--task-order is for --method continual"),
            (args.search_log is None or args.method in ("sro", "soft-sro"),
             "--search-log is for --method sro or soft-sro"),
            (not (args.fsdp and args.method == "dynamix"),
             "--fsdp does not support --method dynamix yet (its look-ahead deals tasks to ranks): "
             "run it without --fsdp")]


def attach(run):
    """This module's sampler in place of the run's (before a resume loads its state), and the method to run."""
    s = run.sampler
    run.sampler = Sampler(s.sizes, s.batch, s.seed)
    return {"continual": run_continual, "sro": run_sro, "soft-sro": run_soft_sro, "ies": run_ies,
            "dynamix": run_dynamix}[run.args.method]


class Sampler(data.MixtureSampler):
    """data.MixtureSampler with three more modes, each example drawn from its task's own seeded cycle (no repeats
    within a task until it is used up).
    Skipped examples (IES): a pass goes over the active examples that are not skipped; a new set starts a new pass.
    Shares (Soft SRO): a pass of task i takes round(n_i x w_i / W) examples, W the size-weighted mean of the weights,
    so a pass keeps the epoch's length and equal weights train exactly what SFT trains, whatever the task sizes.
    Probabilities (DynamixSFT): each slot of a step picks task i with probability w_i / sum(active w); a pass is then
    as many draws as there are active examples, so epochs keep their length."""

    def __init__(self, sizes, batch, seed):
        super().__init__(sizes, batch, seed)
        self.skip: frozenset = frozenset()              # (task, index) left out of the passes
        self.weights, self.shares = None, None
        self.cursors = {t: [0, 0] for t in self.tasks}  # task -> [cycle, position] in its own cycle
        self._pass = None                               # (key, items) of the current shared pass

    def next_of(self, task: str, cursor: list[int]) -> int:
        """The example at `cursor` in the task's cycles, and the cursor moved on (in place)."""
        cycle, pos = cursor
        i = int(self._perm((2, self.tasks.index(task), cycle), self.sizes[task])[pos])
        cursor[:] = [cycle + 1, 0] if pos + 1 == self.sizes[task] else [cycle, pos + 1]
        return i

    def quota(self) -> dict[str, int]:
        """Each active task's examples in one shared pass: largest remainders, so they sum to the pass's length."""
        n = {t: self.sizes[t] for t in self.active}
        mean = sum(n[t] * self.shares[t] for t in n) / sum(n.values())
        exact = {t: n[t] * self.shares[t] / mean for t in n}
        out = {t: math.floor(x) for t, x in exact.items()}
        for t in sorted(n, key=lambda t: out[t] - exact[t])[:sum(n.values()) - sum(out.values())]:
            out[t] += 1
        return out

    def items(self):
        if self.shares is None:
            return [(t, i) for t, i in super().items() if (t, i) not in self.skip]
        key = (self.pass_index, self.active)
        if self._pass is None or self._pass[0] != key:  # the pass's items, from the cursors at its start
            cursors = {t: list(self.cursors[t]) for t in self.active}
            self._pass = (key, [(t, self.next_of(t, cursors[t])) for t, k in self.quota().items() for _ in range(k)])
        return self._pass[1]

    @property
    def size(self) -> int:
        return super().size - sum(t in self.active for t, _ in self.skip)

    def new_pass(self):
        if self.shares is not None:  # the cycles move on by what the pass took
            for t, k in self.quota().items():
                for _ in range(k):
                    self.next_of(t, self.cursors[t])
        super().new_pass()

    def set_skip(self, items):
        items = frozenset((t, int(i)) for t, i in items)
        bad = [(t, i) for t, i in items if t not in self.sizes or not 0 <= i < self.sizes[t]]
        if bad:
            raise ValueError(f"no example {bad[0]} to skip: the sampler has {self.sizes}")
        if items != self.skip:
            self.skip = items
            self.new_pass()

    def set_weights(self, weights: dict[str, float] | None, shares: bool = False):
        """Task weights: probabilities per slot, or (shares=True) each task's share of a pass, by its size."""
        if weights is not None:
            bad = {t: w for t, w in weights.items() if t not in self.sizes
                   or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
            if bad or shares and not all(weights.get(t, 0) > 0 for t in self.tasks):
                raise ValueError(f"weights must be finite and >= 0 (shares > 0, for every task) for tasks of "
                                 f"{', '.join(self.tasks)}: got {weights}")
            weights = {t: float(w) for t, w in sorted(weights.items())}
        self.weights, self.shares = (None, weights) if shares else (weights, None)

    def draw(self, take: int) -> list[tuple[str, int]]:
        if self.weights is None:
            return super().draw(take)
        missing = [t for t in self.active if t not in self.weights]
        if missing:
            raise ValueError(f"active task {missing[0]!r} has no weight (set_weights must cover every active task)")
        w = np.array([self.weights[t] for t in self.active])
        if w.sum() <= 0:
            raise ValueError(f"the active tasks {self.active} all have weight 0")
        batch = []
        for k in np.random.default_rng([self.seed, 1, self.step]).choice(len(w), size=take, p=w / w.sum()):
            task = self.active[k]
            while True:  # the task's own cycle, passing over skipped examples
                i = self.next_of(task, self.cursors[task])
                if (task, i) not in self.skip:
                    break
            batch.append((task, i))
        return batch

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skip": sorted(map(list, self.skip)), "weights": self.weights,
                "shares": self.shares, "cursors": {t: list(c) for t, c in self.cursors.items()}}

    def load_state_dict(self, d: dict):
        super().load_state_dict(d)
        self.skip = frozenset((t, i) for t, i in d["skip"])
        self.weights, self.shares = d["weights"], d["shares"]
        self.cursors = {t: list(c) for t, c in d["cursors"].items()}
        self._pass = None


# -----------------------------------------------------------------------------
# what every baseline shares

def start(run, store, state: dict | None, **fresh) -> dict:
    """A resumed state with its snapshots in the store (msft.keep), or a new one."""
    if state is not None:
        msft.keep(run, store, state)
        return state
    return msft.method_state(**fresh)


def evaluate(run, state: dict, stage: int, active: list[str]) -> dict:
    return msft.score(run, run.tasks, state, stage, active)


def done(run, state: dict, stage: int, excluded=()) -> dict:
    """The method's end: the chosen checkpoint, and the FLOPs and token counts so far (before the test split)."""
    return {"event": "end", "stage": stage, "epoch": state["epoch"], "excluded": list(excluded),
            "best_epoch": state["best"]["epoch"], "best_avg": state["best"]["avg"], "flops": {}}


def advance(run, state: dict, active: list[str], origin: float, end: float):
    """Train `active` (trained together since epoch `origin`) up to the next evaluation: one --interval, or less so
    as not to pass epoch `end`."""
    state["epoch"] = round(min(state["epoch"] + run.args.interval, end), 9)
    run.train(active, origin, state["epoch"])


# -----------------------------------------------------------------------------
# continual SFT

def run_continual(run, store, state: dict | None) -> tuple[dict, dict]:
    """Continual SFT (Scialom et al. 2022): the tasks one after another (--task-order; default the paper's listing
    order, prepare.TASKS, then a user's own tasks by name), each trained alone for --budget epochs and evaluated every
    interval, then rolled back to its own best checkpoint (the earliest where that task's score is highest, the
    phase's start included); the next task starts there, and the last task's best is the final model. Its epochs
    add up each task's own; `mixture_epoch` weighs each by the task's share of the mixture, comparable with SFT's."""
    a = run.args
    paper = prepare.TASKS
    order = a.task_order or sorted(run.tasks, key=lambda t: (paper.index(t), "") if t in paper else (99, t))
    if sorted(order) != run.tasks:
        raise SystemExit(f"--task-order {' '.join(order)}: expected each of the run's tasks {run.tasks} once")
    share = {t: len(run.train_enc[t]) / sum(len(e) for e in run.train_enc.values()) for t in run.tasks}
    state = start(run, store, state, phase=0, phase_start=0.0, task_best=None, started=True, mixture_base=0.0)
    while not state["done"]:
        k = state["phase"]
        task = order[k]
        if not state["started"]:  # the roll-back: parameters only, and a fresh optimizer (Run.restore)
            run.restore(store.load(state["task_best"]["id"]))
            state["started"] = True
        if state["evals"]:  # the base model is evaluated first; a later phase starts at an evaluated checkpoint
            advance(run, state, [task], state["phase_start"], state["phase_start"] + a.budget)
        ev = evaluate(run, state, k + 1, [task])
        # epochs in the mixture's units: a task's epoch is its share of an epoch of the whole mixture
        ev["mixture_epoch"] = round(state["mixture_base"] + (state["epoch"] - state["phase_start"]) * share[task], 9)
        if state["best"]["id"] == state["evals"] - 1:
            state["best"]["mixture_epoch"] = ev["mixture_epoch"]
        best = state["task_best"]
        if best is None or ev["scores"][task] > best["scores"][task]:  # strictly higher: ties keep the earlier
            best = state["task_best"] = {"id": state["evals"] - 1, "epoch": state["epoch"], "scores": ev["scores"],
                                         "mixture_epoch": ev["mixture_epoch"]}
        events = [ev]
        if state["epoch"] >= state["phase_start"] + a.budget - EPS:  # the task's budget is spent
            nxt = order[k + 1] if k + 1 < len(order) else None
            events.append({"event": "decision", "stage": k + 1, "kind": "next_task", "task": task, "excluded": [],
                           "rollback_epoch": best["epoch"], "next_task": nxt})
            if nxt is None:
                state["done"] = True
                events.append(done(run, state, k + 1))
            else:  # the next phase starts from this task's best; its score for the next task is already known
                state.update(phase=k + 1, epoch=best["epoch"], phase_start=best["epoch"], started=False,
                             mixture_base=best["mixture_epoch"])
        state["hold"] = [best["id"]]
        msft.commit(run, store, state, events)
    run.restore(store.load(state["task_best"]["id"]))
    return state["best"], state["task_best"]


# -----------------------------------------------------------------------------
# SRO and Soft SRO SFT: a search run's peaks, then a second run from the base model

def peak_epochs(evals: list[dict]) -> dict[str, float]:
    """task -> epoch of its peak in one SFT run's evaluations: the first where its score is highest."""
    return {t: evals[i]["epoch"] for t, i in msft.peaks([e["scores"] for e in evals]).items()}


def search(run, store, state: dict | None) -> dict:
    """Phase (i) of SRO and Soft SRO: each task's peak epoch in one SFT run of --max-epochs (the paper's 10, as
    SFT), run here first (logged as stage 0) or read from --search-log. Its FLOPs count either way: here through
    the run's counter, from the log as the train and eval FLOPs of its final event. Returns the state of phase
    (ii), with the model back at the base and the sampler as it was at the start."""
    a = run.args
    if state is not None:
        msft.keep(run, store, state)
    elif a.search_log:
        path = Path(a.search_log)
        if not path.is_file():
            raise SystemExit(f"--search-log {path}: not a file (give the log.jsonl of a finished SFT run)")
        evals, final, tokens = [], None, 0
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                e = json.loads(line)
                kind = e["event"]
            except (ValueError, TypeError, KeyError) as err:
                raise SystemExit(f"{path}:{n}: not a log event ({type(err).__name__}: {err})") from None
            if kind == "eval":
                if e.get("stage") != 0 or not isinstance(e.get("epoch"), (int, float)) or \
                        not isinstance(e.get("scores"), dict) or sorted(e["scores"]) != run.tasks:
                    raise SystemExit(f"{path}:{n}: expected an SFT evaluation (stage 0, an epoch, scores of the tasks "
                                     f"{run.tasks}), got stage {e.get('stage')!r}, epoch {e.get('epoch')!r}, "
                                     f"scores of {sorted(e.get('scores') or {})}")
                if abs(e["epoch"] / a.interval - round(e["epoch"] / a.interval)) > 1e-6:
                    raise SystemExit(f"{path}:{n}: an evaluation at epoch {e['epoch']}, off this run's --interval "
                                     f"{a.interval}: the second run could not drop a task there")
                evals.append(e)
            if kind == "train":
                if not isinstance(e.get("tokens"), int):
                    raise SystemExit(f"{path}:{n}: a train event without its token count")
                tokens += e["tokens"]
            final = e if kind == "final" else final
        f, n_params = (final or {}).get("flops"), run.n_params
        if not evals or not isinstance(f, dict) or not all(isinstance(f.get(k), int) for k in ("train", "eval")):
            raise SystemExit(f"{path}: no evaluations, or no final event with FLOPs: not the log of a finished SFT run")
        if f["train"] != 6 * n_params * tokens or f["eval"] % (2 * n_params):
            raise SystemExit(f"{path}: its FLOPs {f} are not those of this model ({n_params} parameters) over its "
                             f"{tokens} training tokens: a search run of another model?")
        try:
            peaks = peak_epochs(evals)
        except ValueError as err:  # a score that is not a finite number
            raise SystemExit(f"{path}: {err}") from None
        run.flops.train(f["train"] // (6 * n_params))
        run.flops.eval(f["eval"] // (2 * n_params))
        run.flops.add("paper_eval", f.get("paper_eval", f["eval"]) // (2 * n_params))
        run.log({"event": "decision", "stage": 0, "kind": "search", "excluded": [], "rollback_epoch": 0.0,
                 "peaks": peaks, "search_epochs": evals[-1]["epoch"], "source": str(path),
                 "search_flops": {k: f[k] for k in ("train", "eval", "paper_eval") if k in f}})
        return start(run, store, None, phase="train", peaks=peaks, search_epochs=evals[-1]["epoch"],
                     active=list(run.tasks), origin=0.0, started=True)
    else:  # the base model is checkpoint 0 of both phases: held until phase (ii) has restored it
        state = start(run, store, None, phase="search", history=[], hold=[0], sampler0=run.sampler.state_dict())
    while state["phase"] == "search":
        if state["evals"]:
            advance(run, state, run.tasks, 0.0, run.sft_epochs)
        ev = evaluate(run, state, 0, run.tasks)
        state["history"].append({"epoch": ev["epoch"], "scores": ev["scores"]})
        events = [ev]
        if state["epoch"] >= run.sft_epochs - EPS:
            peaks = peak_epochs(state["history"])
            events.append({"event": "decision", "stage": 0, "kind": "search", "excluded": [], "rollback_epoch": 0.0,
                           "peaks": peaks, "search_epochs": state["epoch"], "source": "this run"})
            # phase (ii) numbers its checkpoints from 0 again: its checkpoint 0 is the base, as the search's was
            state.update(phase="train", peaks=peaks, search_epochs=state["epoch"], active=list(run.tasks),
                         origin=0.0, epoch=0.0, evals=0, best=None, started=False)
        msft.commit(run, store, state, events)
    if not state["started"]:
        run.restore(store.load(0))
        run.sampler.load_state_dict(state["sampler0"])
        state.update(started=True, hold=[])
    return state


def run_sro(run, store, state: dict | None) -> tuple[dict, dict]:
    """SRO SFT (Appendix C, Alg. 2): (i) search(); (ii) from the base model, all tasks trained together, each
    dropped at its recorded peak epoch (so each is trained as many passes as it took to peak in the search)."""
    state = search(run, store, state)
    while not state["done"]:
        if state["evals"]:
            advance(run, state, state["active"], state["origin"], state["search_epochs"])
        ev = evaluate(run, state, 1, state["active"])
        events = [ev]
        out = [t for t in state["active"] if state["peaks"][t] <= state["epoch"] + EPS]
        if out:  # no roll-back: the task just stops being trained from here
            events.append({"event": "decision", "stage": 1, "kind": "drop", "excluded": out, "rollback_epoch": None,
                           "epoch": state["epoch"], "peaks": {t: state["peaks"][t] for t in out}})
            state["active"] = [t for t in state["active"] if t not in out]
            state["origin"] = state["epoch"]  # the rest are trained together from here: their epochs count anew
        if not state["active"] or state["epoch"] >= state["search_epochs"] - EPS:
            state["done"] = True
            events.append(done(run, state, 1, [t for t in run.tasks if t not in state["active"]]))
        msft.commit(run, store, state, events)
    return state["best"], state["model_at"]


def run_soft_sro(run, store, state: dict | None) -> tuple[dict, dict]:
    """Soft SRO SFT (Appendix C, Alg. 3): (i) search(); (ii) from the base model, all tasks for the search's epochs,
    task i sampled with weight peak(i) / mean(peaks) on top of its size (Sampler's shares: with equal weights, SFT):
    early peakers get fewer passes instead of being dropped."""
    state = search(run, store, state)
    mean = sum(state["peaks"].values()) / len(state["peaks"])
    weights = {t: p / mean for t, p in state["peaks"].items()} if mean > 0 else None  # None: all peak at the base
    run.sampler.set_weights(weights, shares=True)
    while not state["done"]:
        if state["evals"]:
            advance(run, state, run.tasks, 0.0, state["search_epochs"])
        events = [evaluate(run, state, 1, run.tasks)]
        if state["evals"] == 1:
            passes = {t: k / run.sampler.sizes[t] for t, k in run.sampler.quota().items()} if weights else None
            events.append({"event": "decision", "stage": 1, "kind": "weights", "excluded": [], "rollback_epoch": None,
                           "weights": weights, "peaks": state["peaks"], "passes_per_epoch": passes})
        if weights is None or state["epoch"] >= state["search_epochs"] - EPS:
            state["done"] = True
            events.append(done(run, state, 1))
        msft.commit(run, store, state, events)
    return state["best"], state["model_at"]


# -----------------------------------------------------------------------------
# IES: instance-dependent early stopping

def ies_left_out(losses: list[float], window: int, threshold: float, rule: str = "reference") -> bool:
    """IES's rule for one example (Yuan et al. 2025), on d_t = L_t - 2 L_(t-1) + L_(t-2), the second difference of
    its per-epoch losses. "paper" (the mSFT paper's Appendix F): mastered when the last |d| is under `threshold`.
    "reference" (IES's code: second_derivative, k = 1): when the mean of |d| over the last `window` epochs is under
    `threshold`; the code asks for window + 1 second differences first (window + 3 losses)."""
    if rule == "paper":
        return len(losses) >= 3 and abs(losses[-1] - 2 * losses[-2] + losses[-3]) < threshold
    if len(losses) < window + 3:
        return False
    d2 = [abs(losses[j] - 2 * losses[j - 1] + losses[j - 2]) for j in range(len(losses) - window, len(losses))]
    return sum(d2) / window < threshold


@torch.no_grad()
def measure(run, items: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[float], int]:
    """IES: the mean answer-token losses of examples left out of backprop, by forward-only passes (2 N FLOPs a
    token), dealt to the ranks as a training batch is: (the items, their losses, the tokens over all ranks)."""
    items = sorted(items, key=lambda x: len(run.train_enc[x[0]][x[1]][0]))
    out = torch.zeros(len(items) + 1, dtype=torch.float64)  # each item's loss; the tokens
    for part in data.micro_batches(len(items), run.world, run.args.micro_batch)[run.rank] if items else []:
        # a rank with nothing left in this pass still runs one (FSDP's all-gathers need every rank)
        rows = [run.train_enc[t][i] for t, i in (items[j] for j in part or [0])]
        idx, targets = (x.to(run.device) for x in data.collate(rows, run.eos))
        with run.autocast:
            losses = run.model(idx, targets)  # the module itself: no DDP all-reduce
        if part:
            out[list(part)] = losses.double().cpu() / (targets != -100).sum(1).cpu()
            out[-1] += sum(len(ids) - 1 for ids, _ in rows)
    if dist.is_initialized():
        out = out.to(run.device)
        dist.all_reduce(out)
    *losses, tokens = out.tolist()
    run.flops.forward(tokens)
    return items, losses, int(tokens)


def run_ies(run, store, state: dict | None) -> tuple[dict, dict]:
    """IES: SFT's schedule (the whole mixture for --max-epochs) with mastered examples left out. Each epoch is one
    pass over the examples not left out, in full-size steps (so fewer steps as examples leave); each trained
    example's loss is recorded from its training forward (Run.on_losses), and after the epoch the left-out ones'
    losses are measured forward-only (measure). Those join every example's history and the left-out set is
    recomputed from the histories (--ies-rule, --ies-threshold), so examples can come back. The paper's rule starts
    each history with the base model's loss, measured forward-only before the first step: examples can then leave
    from the 3rd epoch on, as the mSFT paper's Appendix F says its IES did."""
    a = run.args
    keep = 3 if a.ies_rule == "paper" else a.ies_window + 3  # the losses the rule looks at
    sizes = {t: len(run.train_enc[t]) for t in run.tasks}
    state = start(run, store, state, losses={t: [[] for _ in range(n)] for t, n in sizes.items()},
                  window={t: [[0.0, 0] for _ in range(n)] for t, n in sizes.items()},
                  left_out={t: [] for t in run.tasks}, closed=0)

    def record(items, losses):  # this epoch's [loss sum, count] of each example, in the state it checkpoints
        for (t, i), loss in zip(items, losses):
            state["window"][t][i][0] += loss
            state["window"][t][i][1] += 1
    run.on_losses.append(record)
    if a.ies_rule == "paper" and not state["evals"]:  # the base model's losses, every history's first
        items, losses, tokens = measure(run, [(t, i) for t in run.tasks for i in range(sizes[t])])
        for (t, i), loss in zip(items, losses):
            state["losses"][t][i].append(loss)
        run.log({"event": "ies", "epoch": 0.0, "left_out": 0, "by_task": {t: 0 for t in run.tasks},
                 "examples": sum(sizes.values()), "forward_tokens": tokens})
    run.sampler.set_skip((t, i) for t, ids in state["left_out"].items() for i in ids)
    while not state["done"]:
        if state["evals"]:
            advance(run, state, run.tasks, state["closed"], run.sft_epochs)
        closing = math.floor(state["epoch"] + EPS) > state["closed"]  # an epoch ended
        if closing:
            *measured, tokens = measure(run, sorted(run.sampler.skip))
            record(*measured)
        events = [evaluate(run, state, 1, run.tasks)]
        if closing:  # every example has its loss of this epoch: recompute the left-out set
            for t in run.tasks:
                for h, (total, count) in zip(state["losses"][t], state["window"][t]):
                    h.append(total / count)
                    del h[:-keep]
                state["left_out"][t] = [i for i, h in enumerate(state["losses"][t])
                                        if ies_left_out(h, a.ies_window, a.ies_threshold, a.ies_rule)]
                state["window"][t] = [[0.0, 0] for _ in range(sizes[t])]
            run.sampler.set_skip((t, i) for t, ids in state["left_out"].items() for i in ids)
            state["closed"] = math.floor(state["epoch"] + EPS)
            events.append({"event": "ies", "epoch": state["epoch"], "left_out": len(run.sampler.skip),
                           "by_task": {t: len(ids) for t, ids in state["left_out"].items()},
                           "examples": sum(sizes.values()), "forward_tokens": tokens})
        if state["epoch"] >= run.sft_epochs - EPS:
            state["done"] = True
            events.append(done(run, state, 1))
        msft.commit(run, store, state, events)
    run.sampler.set_skip(())
    run.on_losses.remove(record)
    return state["best"], state["model_at"]


# -----------------------------------------------------------------------------
# DynamixSFT: the mixture re-weighted by a bandit over one-step look-ahead rewards

def dynamix_weights(q: dict[str, float], p0: dict[str, float], beta: float) -> dict[str, float]:
    """p_k proportional to exp(beta Q_k) p0_k, mixed with GAMMA / K uniform; sums to 1."""
    top = max(q.values())  # exp of Q - max: the same p, and no overflow
    w = {t: math.exp(beta * (q[t] - top)) * p0[t] for t in q}
    total = sum(w.values())
    return {t: (1 - GAMMA) * w[t] / total + GAMMA / len(q) for t in q}


def lookahead(run, items: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DynamixSFT's probe: each example's loss before and after one plain gradient step (the run's lr, no
    optimizer state) on `items`, then the parameters put back; (pre (B,), post (B,), tokens). In fp32 whatever
    the training precision: at lr 1e-5 a bf16 step rounds most updates away, and the rewards with them."""
    params = list(run.model.parameters())
    saved = [p.detach().clone() for p in params]
    idx, targets = (x.to(run.device) for x in data.collate([run.train_enc[t][i] for t, i in items], run.eos))
    n = (targets != -100).sum(1)
    run.model.float()
    try:
        with torch.autocast(run.device.type, enabled=False):
            pre = run.model(idx, targets)
            (pre.sum() / n.sum()).backward()  # the batch's loss over its answer tokens
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=run.args.lr)
                post = run.model(idx, targets)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):  # the weights as they were, in their own dtype
                p.data = s
                p.grad = None
    return pre.detach() / n, post / n, sum(len(run.train_enc[t][i][0]) - 1 for t, i in items)


def run_dynamix(run, store, state: dict | None) -> tuple[dict, dict]:
    """DynamixSFT (Shin et al. 2025): SFT's schedule with the task mixture re-weighted every --dynamix-every
    steps (default 1% of the run's steps). Each update probes every task with lookahead on --dynamix-batch of
    its examples: reward r = mean((L_pre - L_post) / L_pre), min-max normalised across tasks, smoothed into
    Q <- ALPHA Q + (1 - ALPHA) r; then p = dynamix_weights(Q, size shares, --dynamix-beta). The look-ahead costs
    8 N FLOPs a token (forward, backward, forward)."""
    a = run.args
    sizes = {t: len(run.train_enc[t]) for t in run.tasks}
    p0 = {t: n / sum(sizes.values()) for t, n in sizes.items()}
    every = a.dynamix_every or max(1, round(0.01 * run.sft_epochs * sum(sizes.values()) / a.batch_size))
    q0 = {t: 0.0 for t in run.tasks}
    state = start(run, store, state, q=q0, weights=dynamix_weights(q0, p0, a.dynamix_beta))

    def update():  # Run.before_step: before each optimizer step
        if run.step % every:
            return
        rewards = torch.zeros(len(run.tasks), dtype=torch.float64, device=run.device)
        tokens = torch.zeros((), dtype=torch.float64, device=run.device)
        for k, t in enumerate(run.tasks):
            if k % run.world != run.rank:  # the tasks are dealt to the ranks; the sums below share the rewards
                continue
            rng = np.random.default_rng([a.seed, 3, run.step, k])
            items = [(t, int(i)) for i in rng.choice(sizes[t], min(a.dynamix_batch, sizes[t]), replace=False)]
            pre, post, n = lookahead(run, items)
            rewards[k] = ((pre - post) / pre).mean().double()
            tokens += n
        if dist.is_initialized():
            dist.all_reduce(rewards)
            dist.all_reduce(tokens)
        run.flops.lookahead(tokens.item())
        r = dict(zip(run.tasks, rewards.tolist()))
        lo, hi = min(r.values()), max(r.values())
        state["q"] = {t: ALPHA * state["q"][t] + (1 - ALPHA) * ((r[t] - lo) / (hi - lo) if hi > lo else 0.0)
                      for t in run.tasks}
        state["weights"] = dynamix_weights(state["q"], p0, a.dynamix_beta)
        run.sampler.set_weights(state["weights"])
        run.log({"event": "dynamix", "epoch": round(run.epoch, 6), "rewards": r, "q": state["q"],
                 "weights": state["weights"], "lookahead_tokens": int(tokens.item())})

    run.before_step.append(update)
    while not state["done"]:
        if state["evals"]:
            run.sampler.set_weights(state["weights"])
            advance(run, state, run.tasks, 0.0, run.sft_epochs)
        events = [evaluate(run, state, 1, run.tasks)]
        if state["epoch"] >= run.sft_epochs - EPS:
            state["done"] = True
            events.append(done(run, state, 1))
        msft.commit(run, store, state, events)
    run.before_step.remove(update)
    return state["best"], state["model_at"]
