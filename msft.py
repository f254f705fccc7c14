"""mSFT's algorithm core (the paper's Algorithms 1 and 4; docs/protocol.md): the exclusion decision, the roll-back snapshot store, the stage loop.

    python train.py --method msft --model DIR --data MIXTURE --out runs/msft   # drives run_msft with a real model
    python -m pytest -q tests/test_msft.py                                     # drives it with a simulated one

    store = msft.SnapshotStore("runs/msft/snapshots")        # or msft.SnapshotStore() to keep the copies in memory
    state = msft.run_msft(tasks, hooks, budget=3.0, interval=0.25, store=store)   # the release's protocol
    best_params = store.load(state.best["id"])                # the global best; the model itself ends as the final one

Small to large: peaks/decide/needed are pure functions of scores (plain data, no tensors, no I/O, STYLE rule 10);
SnapshotStore holds parameters; run_msft is Algorithm 1 written over callables, so the same loop drives a real model
(train.py) and a simulated one (the tests). A stage's history is a list of checkpoints, each a plain dict
{"id": int, "stage": int, "epoch": float, "scores": {task: score}}; scores are higher-is-better (accuracy, or minus
the loss) and hold every task's latest known score at that checkpoint.

Kill safety: after each evaluation the loop first calls hooks.checkpoint(state), then updates the store (drops what
the state no longer needs, then writes the one new snapshot from the model, which still holds it). A kill at any
moment therefore leaves every snapshot the last checkpointed state needs, except possibly that newest one, which the
resumed run takes again from the model the caller restored; and the store never holds more than needed() says.
"""
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import common

EPS = 1e-9  # epochs closer than this are the same point (sums of float intervals)
DECIMALS = 4  # the release rounds accuracies to 4 decimals before it looks for peaks
SFT_EPOCHS = 10.0  # SFT's length in the paper, and the baselines' (train.py --max-epochs)
# the release drops, of the tasks peaking first together, the first of its tasks by hub id in ASCII order
# (data.HUB); a user's own tasks come after these, by name
RELEASE_ORDER = ("hellaswag", "arc_easy", "openbookqa", "sciq", "winogrande", "aqua_rat", "boolq", "gsm8k",
                 "medmcqa", "commonsense_qa")


# -----------------------------------------------------------------------------
# the decision: pure functions of one stage's scores

def peaks(history: list[dict[str, float]], decimals: int | None = DECIMALS) -> dict[str, int]:
    """task -> index of its peak in one stage's history: the first checkpoint where its score, rounded to `decimals`
    as the release rounds accuracies, is highest."""
    if not history:
        raise ValueError("empty history: a stage has at least its start checkpoint")
    peak, best = {}, {}
    for i, scores in enumerate(history):
        if set(scores) != set(history[0]):
            raise ValueError(f"checkpoint {i} scores tasks {sorted(scores)}, checkpoint 0 {sorted(history[0])}")
        for t, s in scores.items():
            if not isinstance(s, numbers.Real) or not math.isfinite(s):
                raise ValueError(f"task {t!r} at checkpoint {i}: score {s!r} (expected a finite number)")
            s = s if decimals is None else round(s, decimals)
            if t not in peak or s > best[t]:  # strictly higher: a tie keeps the earlier peak
                peak[t], best[t] = i, s
    return peak


def decide(history: list[dict[str, float]], ties: str = "first", order=RELEASE_ORDER,
           decimals: int | None = DECIMALS) -> tuple[list[str], int | None]:
    """One stage's decision from its history (checkpoints in order, the active tasks' scores at each):
    (tasks to exclude; index of the roll-back checkpoint), or ([], None) when no task peaked before the stage's
    last checkpoint. Of the tasks peaking at the earliest peak, ties="first" excludes one, the first in `order`
    (tasks not in it come after, by name), as the release does; ties="all" excludes them all, sorted by name."""
    if ties not in ("all", "first"):
        raise ValueError(f"ties={ties!r}: expected 'all' or 'first'")
    peak = peaks(history, decimals)
    if not peak:
        raise ValueError("no active task in the history: nothing to decide")
    t_star = min(peak.values())
    if t_star == len(history) - 1:  # nothing overfit inside the budget
        return [], None
    out = sorted(t for t, i in peak.items() if i == t_star)
    if ties == "first":
        order = list(order)
        out = sorted(out, key=lambda t: (order.index(t), "") if t in order else (len(order), t))[:1]
    return out, t_star


def needed(history: list[dict], active: list[str], best_id: int) -> set[int]:
    """Ids of the snapshots that must live now (Algorithm 4): each active task's current peak in this stage, plus the
    global best. Right after a decision the history is just the roll-back target, so that and the best remain."""
    peak = peaks([{t: h["scores"][t] for t in active} for h in history])
    # with no active task left, the stage start is the final model, kept until the loop has restored it
    return ({history[i]["id"] for i in peak.values()} or {history[0]["id"]}) | {best_id}


# -----------------------------------------------------------------------------
# the snapshot store: parameters only, by checkpoint id

class SnapshotStore:
    """Parameter snapshots by checkpoint id: CPU copies in memory (dir=None), or safetensors files in `dir` with a
    manifest.json (each snapshot's epoch, stage, scores; the peak count) so that a restarted run finds them.
    Files are written to a temporary name and renamed, the manifest likewise: a kill never leaves half a snapshot,
    and a file the manifest does not list (killed between the two) is removed when the store is opened again. Each
    file carries its id and checksum, and the manifest its own (common.save_tensors): a damaged, cut or swapped one
    is refused naming it, never used.
    holds=False keeps the bookkeeping alone, no tensors (load gives {}): a rank whose parameters come from rank 0 on
    a roll-back (DDP ranks > 0). Under FSDP each rank has a store of its own for its shards (fsdp.py)."""

    def __init__(self, dir: str | os.PathLike | None = None, holds: bool = True):
        self.dir = None if dir is None or not holds else Path(dir)
        self.holds = holds
        self.meta: dict[int, dict] = {}        # id -> {"epoch", "stage", "scores"}
        self.tensors: dict[int, dict] = {}     # memory store only
        self.peak_held = 0                     # most snapshots held at once, over the whole run
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            m = common.read_json(manifest, checked=True)
            try:
                self.meta = {int(i): dict(meta) for i, meta in m["snapshots"].items()}
                self.peak_held = int(m["peak_held"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{manifest}: not a snapshot manifest ({type(e).__name__}: {e})") from None
            for i in self.meta:
                if not self.path(i).is_file():
                    raise FileNotFoundError(f"{manifest} lists snapshot {i} but {self.path(i)} is missing")
        listed = {self.path(i).name for i in self.meta}
        for p in [*self.dir.glob("snapshot-*"), *self.dir.glob(".snapshot-*")]:  # and what a kill left half-written
            if p.name not in listed:
                p.unlink()

    def __repr__(self):
        return f"SnapshotStore({str(self.dir) if self.dir else 'memory'})"

    @property
    def held(self) -> int:
        return len(self.meta)

    def ids(self) -> list[int]:
        return sorted(self.meta)

    def path(self, id: int) -> Path:
        return self.dir / f"snapshot-{id:06d}.safetensors"

    def write_manifest(self):
        common.write_json(self.dir / "manifest.json", {"peak_held": self.peak_held, "snapshots": self.meta},
                          checked=True)

    def save(self, id: int, params: dict[str, torch.Tensor], meta: dict):
        if self.dir is None:
            self.tensors[id] = {k: v.detach().to("cpu", copy=True) for k, v in params.items()} if self.holds else {}
        else:
            common.save_tensors(self.path(id), params, f"snapshot {id}")
        self.meta[id] = json.loads(json.dumps(meta))  # a copy: the caller's dicts change later
        self.peak_held = max(self.peak_held, len(self.meta))
        if self.dir is not None:
            self.write_manifest()

    def load(self, id: int) -> dict[str, torch.Tensor]:
        """The snapshot's tensors on the CPU (the memory store's own copies: copy them in, do not modify)."""
        if id not in self.meta:
            raise KeyError(f"{self}: no snapshot {id} (held: {self.ids()})")
        return self.tensors[id] if self.dir is None else common.load_tensors(self.path(id), f"snapshot {id}")

    def drop(self, id: int):
        del self.meta[id]
        if self.dir is None:
            del self.tensors[id]
        else:
            self.write_manifest()  # manifest first: a kill in between leaves an unlisted file, removed at next open
            self.path(id).unlink()

    def keep(self, wanted: set[int], newest: int, take):
        """Hold exactly the snapshots `wanted` (Algorithm 4): the others dropped first, so never more than wanted is held,
        even for a moment; then the missing ones saved, which can only be `newest`, the checkpoint the model holds
        now (a kill came between the checkpoint of the state that wants it and this call): take(id) -> (params,
        meta). Every method's store goes through here: msft.run_msft's, SFT's and the baselines' (commit)."""
        for i in self.ids():
            if i not in wanted:
                self.drop(i)
        for i in sorted(set(wanted) - set(self.ids())):
            if i != newest and self.holds:
                raise FileNotFoundError(f"{self}: snapshot {i} is missing, but the state needs it to continue")
            self.save(i, *take(i))


# -----------------------------------------------------------------------------
# the loop: Algorithm 1 over callables

@dataclass
class LoopState:
    """Where the loop is, as plain JSON data: enough to continue exactly after a kill."""
    tasks: list[str]        # every task, sorted
    config: dict            # run_msft's settings: a resumed run must pass the same
    stage: int              # from 1
    epoch: float            # epoch of the current checkpoint, cumulative from the base model
    active: list[str]
    excluded: list[str]     # in the order they were excluded
    history: list[dict]     # this stage's checkpoints {"id", "stage", "epoch", "scores"}; [0] is where it starts
    best: dict | None       # the global best: its checkpoint dict plus "avg" (average over ALL tasks)
    next_id: int            # id of the next checkpoint
    model_at: int           # id of the checkpoint whose parameters the caller's model holds
    started: bool           # this stage's start is restored (stage 1: the base model as loaded)
    pending: list[str]      # tasks still to evaluate at this stage's start (the base model; eval_excluded="rollback")
    done: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LoopState":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a LoopState is a dict with keys {sorted(names)}, got {got}")
        return cls(**json.loads(json.dumps(d)))  # a deep copy: the caller's dict stays untouched


def checked_scores(scores, which: list[str], epoch: float) -> dict[str, float]:
    """hooks.evaluate's answer, refused unless it is a finite number for each task asked for."""
    if not isinstance(scores, dict) or set(scores) != set(which):
        got = sorted(scores) if isinstance(scores, dict) else type(scores).__name__
        raise ValueError(f"hooks.evaluate({which}) at epoch {epoch} returned scores for {got}")
    for t, s in scores.items():
        if not isinstance(s, numbers.Real) or not math.isfinite(s):
            raise ValueError(f"task {t!r} at epoch {epoch}: score {s!r} (expected a finite number)")
    return {t: float(s) for t, s in scores.items()}


def scored(state: LoopState, ckpt: dict, scores: dict) -> dict:
    """The eval event of a checkpoint; its average is over ALL tasks, and the global best is the highest average
    seen, the earliest on ties."""
    avg = sum(ckpt["scores"][t] for t in state.tasks) / len(state.tasks)
    if state.best is None or avg > state.best["avg"]:
        state.best = {**json.loads(json.dumps(ckpt)), "avg": avg}
    return {"event": "eval", "stage": state.stage, "epoch": ckpt["epoch"], "checkpoint": ckpt["id"],
            "active": list(state.active), "evaluated": sorted(scores), "scores": scores, "avg": avg}


def sync_store(hooks, store: SnapshotStore, state: LoopState):
    """The store holds exactly what the state needs (Algorithm 4); the one missing can only be the newest checkpoint."""
    def take(i):
        ckpt = {h["id"]: h for h in state.history}.get(i, state.best)
        return hooks.snapshot(), {"epoch": ckpt["epoch"], "stage": ckpt["stage"], "scores": ckpt["scores"]}
    store.keep(needed(state.history, state.active, state.best["id"]), state.model_at, take)


def close_stage(state: LoopState) -> dict:
    """At a stage's last checkpoint: decide (Algorithm 1), and set the state at the next stage's start, which is
    the roll-back target, or the last checkpoint when no task overfit. Returns the decision event."""
    c = state.config
    hist = [{t: h["scores"][t] for t in state.active} for h in state.history]
    out, i = decide(hist, c["ties"], c["order"])
    target = state.history[-1 if i is None else i]
    event = {"event": "decision", "stage": state.stage, "kind": "drop" if out else "no_drop", "excluded": out,
             "epoch": state.history[-1]["epoch"], "rollback_epoch": None if i is None else target["epoch"],
             "peaks": {t: state.history[j]["epoch"] for t, j in sorted(peaks(hist).items())}}
    state.pending = list(state.excluded) if c["eval_excluded"] == "rollback" else []
    state.excluded += out
    state.active = [t for t in state.active if t not in out]
    state.stage += 1
    state.history = [target]  # the next stage starts here; its peaks are found within it
    state.epoch, state.started = target["epoch"], False
    return event


def run_msft(tasks: list[str], hooks, *, budget: float, interval: float, store: SnapshotStore, max_stages: int = 10,
             max_epochs: float | None = None, ties: str = "first", order=RELEASE_ORDER,
             eval_excluded: str = "every", state: LoopState | None = None) -> LoopState:
    """Run mSFT to the end, or continue `state` (the last one passed to hooks.checkpoint) after a kill. It ends when
    no task is left or after max_stages stages (the release: 10), or at max_epochs cumulative epochs if given.

    hooks: train(active, origin, until) (train the active mixture, which began to be trained at epoch `origin`, up to
    epoch `until`), evaluate(tasks) -> {task: score}, snapshot() -> params, restore(params) (the caller also resets
    its optimizer), log(event), checkpoint(state) (called after every evaluation, decision and the end: persist it
    with the model, optimizer, sampler and log length; the model then is the one of checkpoint state.model_at).
    Every stage after the first begins with restore(its start): the roll-back target, or after no drop the
    parameters the model already has, so that each stage starts with a fresh optimizer (Algorithm 1). On return the
    caller's model is the final model (state.history[0]) and store.load(state.best["id"]) gives the global best.
    eval_excluded="every" evaluates every task at every checkpoint (exact global best); "rollback" evaluates the
    tasks excluded in earlier stages once per stage, at the checkpoint the next stage starts from (Appendix F),
    and carries their latest score into the averages in between.
    """
    config = {"budget": budget, "interval": interval, "max_stages": max_stages, "max_epochs": max_epochs,
              "ties": ties, "order": list(order), "eval_excluded": eval_excluded}
    if not (budget > 0 and interval > 0 and max_stages >= 1 and (max_epochs is None or max_epochs > 0)):
        raise ValueError(f"budget, interval, max_stages and max_epochs must be > 0, got {config}")
    if ties not in ("all", "first") or eval_excluded not in ("every", "rollback"):
        raise ValueError(f"ties must be 'all' or 'first' and eval_excluded 'every' or 'rollback', got {config}")
    if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be distinct names, got {tasks}")
    tasks = sorted(tasks)

    if state is None:  # stage 1 starts at the base model, with every task still to evaluate
        state = LoopState(tasks=tasks, config=config, stage=1, epoch=0.0, active=list(tasks), excluded=[],
                          history=[{"id": 0, "stage": 1, "epoch": 0.0, "scores": {}}], best=None, next_id=1,
                          model_at=0, started=True, pending=list(tasks))
    else:
        if state.tasks != tasks or state.config != config:
            raise ValueError(f"cannot continue a run of tasks {state.tasks} with {state.config} as tasks {tasks} "
                             f"with {config}: pass the same tasks and flags")
        sync_store(hooks, store, state)  # a kill may have come between hooks.checkpoint and the store's update

    while not state.done:
        start = state.history[0]
        if not state.started:  # the roll-back (parameters only), or after no drop the same parameters: either way
            hooks.restore(store.load(start["id"]))  # the caller's optimizer starts afresh, as in the official code
            state.model_at, state.started = start["id"], True

        if state.pending:  # the stage's start: the base model, or excluded tasks once per stage ("rollback")
            scores = checked_scores(hooks.evaluate(list(state.pending)), state.pending, start["epoch"])
            start["scores"].update(scores)
            state.pending = []
            events = [scored(state, start, scores)]
        elif not state.active or state.stage > max_stages or state.epoch >= (max_epochs or math.inf) - EPS:
            state.done = True
            events = [{"event": "end", "stage": state.stage - 1, "epoch": state.epoch, "excluded": list(state.excluded),
                       "active": list(state.active), "best_epoch": state.best["epoch"], "best_avg": state.best["avg"],
                       "snapshots_peak": store.peak_held}]
        else:  # one interval of the roll-out; the last one of a stage may be shorter so as not to pass max_epochs
            end = round(min(start["epoch"] + budget, max_epochs or math.inf), 9)
            epoch = round(min(start["epoch"] + len(state.history) * interval, end), 9)
            hooks.train(list(state.active), start["epoch"], epoch)
            which = tasks if eval_excluded == "every" else state.active
            scores = checked_scores(hooks.evaluate(list(which)), which, epoch)
            ckpt = {"id": state.next_id, "stage": state.stage, "epoch": epoch,
                    "scores": {**state.history[-1]["scores"], **scores}}
            state.history.append(ckpt)
            state.next_id += 1
            state.epoch, state.model_at = epoch, ckpt["id"]
            events = [scored(state, ckpt, scores)] + ([close_stage(state)] if epoch >= end - EPS else [])
        if events[0]["event"] == "eval":  # what the store keeps once this step is done
            events[0]["snapshots_held"] = len(needed(state.history, state.active, state.best["id"]))
        for e in events:
            hooks.log(e)
        hooks.checkpoint(state)
        sync_store(hooks, store, state)
    return state


# -----------------------------------------------------------------------------
# the other methods' bookkeeping (SFT in train.py, the baselines): a plain-JSON state, one evaluation, one commit

def method_state(**fresh) -> dict:
    """Epoch, evaluations so far (the next checkpoint's id), the best average, the checkpoint the model is at, the
    snapshots held besides the best (`hold`), whether the method is done."""
    return {"epoch": 0.0, "evals": 0, "best": None, "model_at": None, "hold": [], "done": False, **fresh}


def score(hooks, tasks: list[str], state: dict, stage: int, active: list[str]) -> dict:
    """Evaluate every task on the model as it is (checkpoint number state["evals"], at state["epoch"]); the best
    average so far, the earliest on ties, becomes state["best"]. Returns the eval event."""
    scores = hooks.evaluate(tasks)
    avg = sum(scores.values()) / len(scores)
    if state["best"] is None or avg > state["best"]["avg"]:
        state["best"] = {"id": state["evals"], "epoch": state["epoch"], "avg": avg}
    state["model_at"] = {"id": state["evals"], "epoch": state["epoch"]}
    state["evals"] += 1
    return {"event": "eval", "stage": stage, "epoch": state["epoch"], "checkpoint": state["evals"] - 1,
            "active": sorted(active), "evaluated": list(tasks), "scores": scores, "avg": avg}


def wanted(state: dict) -> set[int]:
    return set(state["hold"]) | ({state["best"]["id"]} if state["best"] else set())


def keep(hooks, store: SnapshotStore, state: dict):
    """The store holds the best and state["hold"]; called by commit, and by a resumed method before it goes on."""
    at = state["model_at"]
    store.keep(wanted(state), at["id"], lambda i: (hooks.snapshot(), {"epoch": at["epoch"]}))


def commit(hooks, store: SnapshotStore, state: dict, events: list[dict]):
    """Log the events (the evaluation first), checkpoint the state, then update the store: in run_msft's order, so a
    kill at any moment leaves every snapshot the last checkpoint needs but possibly the newest, which keep() takes
    again from the model the resumed run restored."""
    events[0]["snapshots_held"] = len(wanted(state))
    for e in events:
        hooks.log(e)
    hooks.checkpoint(state)
    keep(hooks, store, state)

