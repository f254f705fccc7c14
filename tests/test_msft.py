"""Pins msft.py (decision, snapshot store, loop) against versions written here from the words of SPEC sections 3-4.

- decide() equals a brute-force reading of "peak = first checkpoint of a task's highest score (rounded to 4
  decimals), t* = min of the peaks, no drop when t* is the stage's last checkpoint; of the tasks peaking at t*, the
  first in the release's order (its hub ids in ASCII order; other tasks after, by name), or all" on random histories
  (ties, plateaus, scores that tie only once rounded, one task, many tasks), in both tie modes; a NaN score is an
  error naming the task and the checkpoint.
- The bookkeeping, driven by random scores, never drops a snapshot a later decision needs, holds at most active
  tasks + 1, and keeps only the roll-back target and the global best after a decision.
- run_msft on a simulated model (per-task score curves of how long each task was trained; the fake parameters
  are those training amounts, so a wrong roll-back changes every later score) makes the same decisions and ends with
  the same final model and global best as a brute-force loop that keeps a copy of every checkpoint; it never trains
  an excluded task, excludes each task once, and its global best is the max of the averages it logged.
- Restart: a kill at any hook call, then run_msft(state=last checkpointed state) with the reopened disk store, gives
  the uninterrupted run's log (no event missing or twice), decisions, store and result; a reopened store is intact.
"""
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import msft
import prepare

# five of the release's tasks and two of a user's own
NAMES = ["sciq", "gsm8k", "hellaswag", "boolq", "arc_easy", "my_task", "alpha"]


def release_rank(task):
    """SPEC 9: the release drops the first of its tasks by hub id, sorted as ASCII; a user's tasks come after, by
    name. Restated here from prepare.HUB's ids, not from msft's constant."""
    hub = sorted(prepare.HUB[t][0] for t in prepare.TASKS)
    return (hub.index(prepare.HUB[task][0]), "") if task in prepare.HUB else (len(hub), task)


def brute_decide(history, ties):
    """SPEC 3 and 9 word for word, on lists: the slow and obvious version."""
    tasks = sorted(history[0])
    peak = {}
    for t in tasks:
        curve = [round(h[t], 4) for h in history]
        peak[t] = curve.index(max(curve))  # list.index: the first checkpoint with the highest score
    t_star = min(peak.values())
    if t_star == len(history) - 1:
        return [], None
    tied = [t for t in tasks if peak[t] == t_star]
    return (tied if ties == "all" else [min(tied, key=release_rank)]), t_star


# few distinct values give ties and plateaus; near values tie only once rounded; floats give the general case
near = st.sampled_from([0.5, 0.50001, 0.50004, 0.49996, 0.5001])
score_values = st.one_of(st.integers(0, 2), st.integers(0, 50), near, st.floats(-5, 5, allow_nan=False))


@st.composite
def histories(draw):
    tasks = draw(st.permutations(NAMES))[:draw(st.integers(1, len(NAMES)))]
    values = draw(st.sampled_from([st.integers(0, 2), st.integers(0, 50), near, st.floats(-5, 5, allow_nan=False)]))
    return [{t: draw(values) for t in tasks} for _ in range(draw(st.integers(1, 9)))]


# -----------------------------------------------------------------------------
# the decision

def test_decide_hand_examples():
    a_plateau = [{"a": .5, "b": .2}, {"a": .7, "b": .3}, {"a": .7, "b": .4}, {"a": .6, "b": .5}]
    assert msft.decide(a_plateau) == (["a"], 1)  # a's plateau: its first checkpoint is the peak
    rising = [{"a": .1, "b": .2}, {"a": .2, "b": .3}, {"a": .3, "b": .4}]
    assert msft.decide(rising) == ([], None)  # nothing peaked before the last checkpoint
    together = [{"c": 1, "a": 1, "b": 0}, {"c": 2, "a": 2, "b": 1}, {"c": 1, "a": 0, "b": 2}]
    assert msft.decide(together, ties="all") == (["a", "c"], 1)
    assert msft.decide(together) == (["a"], 1)  # the first by name: neither is one of the release's tasks
    # the release's order: hellaswag (Rowan/hellaswag) before sciq (allenai/sciq) before gsm8k (openai/gsm8k)
    three = [{"gsm8k": 0, "sciq": 0, "hellaswag": 0}, {"gsm8k": 1, "sciq": 1, "hellaswag": 1}, {"gsm8k": 0, "sciq": 0, "hellaswag": 0}]
    assert msft.decide(three) == (["hellaswag"], 1)
    assert msft.decide([{t: s[t] for t in ("gsm8k", "sciq")} for s in three]) == (["sciq"], 1)
    assert msft.decide([{"gsm8k": s["gsm8k"], "mine": s["sciq"]} for s in three]) == (["gsm8k"], 1)  # ours after
    # 0.61231 and 0.61234 are one score once rounded to 4 decimals: the earlier checkpoint is the peak
    assert msft.decide([{"a": 0.5, "b": 0.1}, {"a": 0.61231, "b": 0.2}, {"a": 0.61234, "b": 0.3}]) == (["a"], 1)
    assert msft.decide([{"a": 0.5, "b": 0.1}, {"a": 0.61231, "b": 0.2}, {"a": 0.61234, "b": 0.3}],
                       decimals=None) == ([], None)
    assert msft.decide([{"a": 3, "b": 1}, {"a": 2, "b": 2}]) == (["a"], 0)  # training only hurt a: back to the start
    assert msft.decide([{"a": 0.4}]) == ([], None)  # a single checkpoint is its own last one


@settings(max_examples=800, deadline=None)
@given(histories(), st.sampled_from(["all", "first"]))
def test_decide_equals_brute_force(history, ties):
    assert msft.decide(history, ties) == brute_decide(history, ties)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", None])
def test_decide_rejects_non_numbers_naming_task_and_checkpoint(bad):
    history = [{"a": 0.1, "b": 0.2}, {"a": 0.3, "b": 0.2}, {"a": 0.3, "b": bad}]
    with pytest.raises(ValueError, match=r"task 'b' at checkpoint 2"):
        msft.decide(history)


def test_decide_rejects_bad_input():
    with pytest.raises(ValueError, match="empty history"):
        msft.decide([])
    with pytest.raises(ValueError, match="checkpoint 1 scores tasks"):
        msft.decide([{"a": 1, "b": 1}, {"a": 2}])
    with pytest.raises(ValueError, match="ties='some'"):
        msft.decide([{"a": 1}], ties="some")


# -----------------------------------------------------------------------------
# the bookkeeping (pure: no tensors), thousands of stages a second

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_bookkeeping_keeps_what_later_decisions_need(data):
    tasks = NAMES[:data.draw(st.integers(1, len(NAMES)))]
    ties = data.draw(st.sampled_from(["all", "first"]))
    active, next_id = list(tasks), 1
    history = [{"id": 0, "scores": {t: data.draw(score_values) for t in tasks}}]
    best = (data.draw(score_values), 0)  # (average, id): stands in for the average over all tasks
    held = {0}
    for _ in range(data.draw(st.integers(1, 5))):  # stages
        if not active:
            break
        for _ in range(data.draw(st.integers(1, 6))):  # checkpoints of the stage
            history.append({"id": next_id, "scores": {t: data.draw(score_values) for t in active}})
            avg = data.draw(score_values)
            if avg > best[0]:
                best = (avg, next_id)
            keep = msft.needed(history, active, best[1])
            assert keep <= held | {next_id}, "a snapshot came back after it was dropped"
            # brute force: a checkpoint lives while it holds some active task's highest score so far (the first one)
            for t in active:
                curve = [round(h["scores"][t], 4) for h in history]
                assert history[curve.index(max(curve))]["id"] in keep
            assert len(keep) <= len(active) + 1
            held = keep
            next_id += 1
        out, i = brute_decide([{t: h["scores"][t] for t in active} for h in history], ties)
        target = history[-1] if i is None else history[i]
        assert target["id"] in held, "the roll-back target was dropped"
        active = [t for t in active if t not in out]
        history = [target]
        held = msft.needed(history, active, best[1])
        assert held == {target["id"], best[1]}  # nothing else survives a decision


# -----------------------------------------------------------------------------
# the store

def test_store_copies_and_roundtrips(tmp_path):
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    for store in (msft.SnapshotStore(), msft.SnapshotStore(tmp_path / "snaps")):
        store.save(7, lin.state_dict(), {"epoch": 0.25, "stage": 1, "scores": {"a": 0.5}})
        before = {k: v.clone() for k, v in lin.state_dict().items()}
        with torch.no_grad():
            lin.weight.add_(1.0)  # training goes on in place: the snapshot must not move
        got = store.load(7)
        assert got.keys() == before.keys()
        for k in before:
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], before[k])
        assert store.held == 1 and store.peak_held == 1 and store.ids() == [7]
        store.drop(7)
        assert store.held == 0 and store.peak_held == 1
        with pytest.raises(KeyError, match="no snapshot 7"):
            store.load(7)


def test_store_reopens_and_cleans_up(tmp_path):
    store = msft.SnapshotStore(tmp_path)
    for i in range(3):
        store.save(i, {"x": torch.full((2,), float(i))}, {"epoch": i / 4, "stage": 1, "scores": {"a": i}})
    store.drop(1)
    # a kill between a file's rename and the manifest's update leaves an unlisted file; one mid-write a .tmp
    (tmp_path / "snapshot-000009.safetensors").write_bytes(b"junk")
    (tmp_path / ".snapshot-000010.safetensors.tmp").write_bytes(b"junk")
    again = msft.SnapshotStore(tmp_path)
    assert again.ids() == [0, 2] and again.peak_held == 3
    assert again.meta[2] == {"epoch": 0.5, "stage": 1, "scores": {"a": 2}}
    assert torch.equal(again.load(2)["x"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "snapshot-000000.safetensors",
                                                          "snapshot-000002.safetensors"]
    (tmp_path / "snapshot-000002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists snapshot 2 but .*snapshot-000002.safetensors is missing"):
        msft.SnapshotStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        msft.SnapshotStore(tmp_path)


# -----------------------------------------------------------------------------
# the loop, on a simulated model

class Killed(Exception):
    pass


@st.composite
def sims(draw):
    """Per-task curves: score = n sin(7 own + 3 others) - w (own - p)^2 - f others, rounded to a step q (steps make
    plateaus and ties; the wiggle makes many distinct peaks). own = epochs this task was trained, others = epochs the
    other tasks were; p = 50 never overfits."""
    tasks = sorted(NAMES[:draw(st.integers(1, 5))])
    grid = st.integers(0, 16).map(lambda k: k / 4)  # binary-exact epochs, so both loops sum them the same way
    curves = {t: (draw(grid | st.just(50.0)), draw(st.sampled_from([0.0, 0.3, 2.0])),
                  draw(st.sampled_from([0.0, 0.1, 1.0, 5.0])), draw(st.sampled_from([0.0, 0.02, 0.1])),
                  draw(st.sampled_from([0.01, 0.1, 1.0]))) for t in tasks}
    budget = draw(st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.5]))
    interval = draw(st.sampled_from([0.125, 0.25, 0.5]))
    bounds = draw(st.sampled_from([dict(max_epochs=e) for e in (0.5, 1.0, 2.25, 4.0)]
                                  + [dict(max_stages=s) for s in (1, 2, 3, 10)]))
    return tasks, curves, budget, interval, bounds


def sim_score(curves, tasks, x, t):
    p, n, w, f, q = curves[t]
    own = x[tasks.index(t)].item()
    others = x.sum().item() - own
    return round((n * math.sin(7 * own + 3 * others) - w * (own - p) ** 2 - f * others) / q) * q


class Hooks:
    """The simulated model: x[i] = epochs task i has been trained. Records everything and checks invariants."""

    def __init__(self, tasks, curves, store=None, x=None, events=None, kill_at=None, check=False, segment=None):
        self.tasks, self.curves, self.store, self.kill_at, self.check = tasks, curves, store, kill_at, check
        self.x = torch.zeros(len(tasks), dtype=torch.float64) if x is None else x.clone()
        self.segment = segment  # (active, origin, epoch reached): as train.Run counts from a segment's origin
        self.events = list(events or [])
        self.calls, self.saved, self.expect, self.after_decision = {}, None, None, None  # calls: hook -> count
        self.seen = []  # (eval event, x at that evaluation)
        self.stage = []  # (epoch, x) of this stage's checkpoints, its start first
        self.excluded = [t for e in self.events if e["event"] == "decision" for t in e["excluded"]]
        self.active = list(tasks)  # the active tasks of the last evaluation: the stage the store serves

    def tick(self, hook, synced=True):
        self.calls[hook] = self.calls.get(hook, 0) + 1
        assert self.calls[hook] < 5_000, "the loop does not terminate"
        if (hook, self.calls[hook]) == self.kill_at:  # killed on the n-th call of this hook, before it acts
            raise Killed
        if self.store is not None:  # at every moment the loop hands over, never more than active tasks + 1
            assert self.store.held <= max(len(self.active), 1) + 1
        if self.after_decision is not None and synced:  # the store synced: only the roll-back target and best remain
            held = {tuple(self.store.load(i)["x"].tolist()) for i in self.store.ids()}
            assert held == self.after_decision, (held, self.after_decision)
            self.after_decision = None

    def train(self, active, origin, until):
        self.tick("train")
        assert not set(active) & set(self.excluded), "trained an excluded task"
        if self.segment is None or self.segment[:2] != (active, origin):
            self.segment = (active, origin, origin)
        assert until > self.segment[2]
        for t in active:
            self.x[self.tasks.index(t)] += until - self.segment[2]  # in place: the store must copy what it keeps
        self.segment = (active, origin, until)

    def evaluate(self, which):
        self.tick("evaluate")
        return {t: sim_score(self.curves, self.tasks, self.x, t) for t in which}

    def snapshot(self):
        self.tick("snapshot", synced=False)  # called while the store syncs
        return {"x": self.x}

    def restore(self, params):
        self.tick("restore")
        self.x.copy_(params["x"])
        self.segment = None

    def log(self, event):
        self.tick("log")
        event = json.loads(json.dumps(event))
        self.events.append(event)
        if event["event"] == "eval":
            self.seen.append((event, self.x.clone()))
            self.stage.append((event["epoch"], self.x.clone()))
            self.active = event["active"]
            assert event["snapshots_held"] <= max(len(event["active"]), 1) + 1
        if event["event"] == "decision":
            self.excluded += event["excluded"]
            if self.check:  # (a resumed Hooks has not seen the stage's start)
                back = event["rollback_epoch"]
                target = self.x.clone() if back is None else [x for epoch, x in self.stage if epoch == back][0]
                self.stage = [(self.stage[-1][0] if back is None else back, target)]
                best = max(self.seen, key=lambda ex: ex[0]["avg"])[1]  # max(): the earliest of equal averages
                self.expect = {tuple(target.tolist()), tuple(best.tolist())}

    def checkpoint(self, state):
        self.tick("checkpoint")
        self.after_decision, self.expect = self.expect, None  # checked at the next call, once the store synced
        self.saved = (state.to_json(), self.x.clone(), len(self.events), self.segment)


def reference_run(tasks, curves, budget, interval, bounds, ties):
    """SPEC 3 and 9 read literally, with a copy of every checkpoint kept (no store, no pruning, no state): stages
    until no task is left, or after max_stages (default 10), or at max_epochs when given."""
    max_epochs, max_stages = bounds.get("max_epochs", math.inf), bounds.get("max_stages", 10)
    def scores(x):
        return {t: sim_score(curves, tasks, x, t) for t in tasks}

    def avg(s):
        return sum(s[t] for t in tasks) / len(tasks)

    x = torch.zeros(len(tasks), dtype=torch.float64)
    start = (0.0, x, scores(x))
    best, excluded, decisions = (avg(start[2]), 0.0, x), [], []
    while len(excluded) < len(tasks) and start[0] < max_epochs and len(decisions) < max_stages:
        active = [t for t in tasks if t not in excluded]
        ckpts, end = [start], min(start[0] + budget, max_epochs)
        while ckpts[-1][0] < end:
            epoch = min(start[0] + len(ckpts) * interval, end)
            x = ckpts[-1][1].clone()
            for t in active:
                x[tasks.index(t)] += epoch - ckpts[-1][0]
            ckpts.append((epoch, x, scores(x)))
            if avg(ckpts[-1][2]) > best[0]:
                best = (avg(ckpts[-1][2]), epoch, x)
        out, i = brute_decide([{t: c[2][t] for t in active} for c in ckpts], ties)
        decisions.append(("drop" if out else "no_drop", out, None if i is None else ckpts[i][0]))
        excluded += out
        start = ckpts[-1] if i is None else ckpts[i]
    return decisions, best, start[1]


def decisions_of(events):
    return [(e["kind"], e["excluded"], e["rollback_epoch"]) for e in events
            if e["event"] == "decision"]


@settings(max_examples=150, deadline=None)
@given(sims(), st.sampled_from(["all", "first"]), st.sampled_from(["every", "rollback"]))
def test_loop_matches_brute_force_and_keeps_its_invariants(sim, ties, eval_excluded):
    tasks, curves, budget, interval, bounds = sim
    store = msft.SnapshotStore()
    hooks = Hooks(tasks, curves, store, check=True)
    state = msft.run_msft(tasks, hooks, budget=budget, interval=interval, **bounds, store=store,
                          ties=ties, eval_excluded=eval_excluded)
    decisions, best, final = reference_run(tasks, curves, budget, interval, bounds, ties)
    # the excluded tasks' evaluations never change the model, so both modes make the reference's decisions
    assert decisions_of(hooks.events) == decisions
    assert torch.equal(hooks.x, final)  # the roll-backs restored the right parameters
    assert state.done and hooks.events[-1]["event"] == "end"
    # each stage after the first starts with one restore (roll-back, or the same parameters: a fresh optimizer)
    assert hooks.calls.get("restore", 0) == len(decisions)
    excluded = [t for e in hooks.events if e["event"] == "decision" for t in e["excluded"]]
    assert len(excluded) == len(set(excluded)) and excluded == state.excluded
    assert sorted(state.active + state.excluded) == tasks
    evals = [e for e in hooks.events if e["event"] == "eval"]
    assert evals[0]["epoch"] == 0.0 and evals[0]["evaluated"] == tasks
    assert all(e["epoch"] <= bounds.get("max_epochs", math.inf) for e in evals)
    assert len(decisions) <= bounds.get("max_stages", 10)
    # the global best is the highest logged average, the earliest of equals, and the store holds its parameters
    top = max(evals, key=lambda e: e["avg"])
    assert (state.best["avg"], state.best["epoch"]) == (top["avg"], top["epoch"])
    assert torch.equal(store.load(state.best["id"])["x"], [x for e, x in hooks.seen if e is top][0])
    assert store.peak_held <= len(tasks) + 1
    if eval_excluded == "every":
        assert all(e["evaluated"] == tasks for e in evals)
        assert (state.best["avg"], state.best["epoch"]) == (best[0], best[1])
        assert torch.equal(store.load(state.best["id"])["x"], best[2])
    else:  # the active tasks at every checkpoint; the tasks excluded in earlier stages once, where a stage starts
        assert all(e["evaluated"] == e["active"] for e in evals[1:] if set(e["evaluated"]) & set(e["active"]))
        before = []
        for i, e in enumerate(hooks.events):
            if e["event"] == "decision":
                if before:
                    start = hooks.events[i - 1]["epoch"] if e["rollback_epoch"] is None else e["rollback_epoch"]
                    assert hooks.events[i + 1]["evaluated"] == sorted(before)
                    assert hooks.events[i + 1]["epoch"] == start
                before += e["excluded"]


def test_loop_rejects_bad_scores_and_a_changed_resume():
    tasks, curves = ["a", "b"], {"a": (1.0, 0.0, 1.0, 0.0, 0.01), "b": (2.0, 0.0, 1.0, 0.0, 0.01)}
    hooks = Hooks(tasks, curves)
    hooks.evaluate = lambda which: {t: (math.nan if t == "b" and hooks.x.sum() > 0 else 0.0) for t in which}
    with pytest.raises(ValueError, match=r"task 'b' at epoch 0.25: score nan"):
        msft.run_msft(tasks, hooks, budget=1, interval=0.25, max_epochs=2, store=msft.SnapshotStore())
    hooks.evaluate = lambda which: {"a": 0.0}
    with pytest.raises(ValueError, match=r"returned scores for \['a'\]"):
        msft.run_msft(tasks, hooks, budget=1, interval=0.25, max_epochs=2, store=msft.SnapshotStore())
    hooks = Hooks(tasks, curves, kill_at=("checkpoint", 2))
    with pytest.raises(Killed):
        msft.run_msft(tasks, hooks, budget=1, interval=0.25, max_epochs=2, store=msft.SnapshotStore())
    state = msft.LoopState.from_json(hooks.saved[0])
    with pytest.raises(ValueError, match="pass the same tasks and flags"):
        msft.run_msft(tasks, Hooks(tasks, curves), budget=0.5, interval=0.25, max_epochs=2,
                      store=msft.SnapshotStore(), state=state)
    with pytest.raises(ValueError, match="a LoopState is a dict with keys"):
        msft.LoopState.from_json({"stage": 1})
    with pytest.raises(ValueError, match="budget, interval, max_stages and max_epochs must be > 0"):
        msft.run_msft(tasks, hooks, budget=0, interval=0.25, max_epochs=2, store=msft.SnapshotStore())


@pytest.mark.parametrize("flags, stages", [({}, 10), ({"max_stages": 3}, 3), ({"max_epochs": 2.5}, 3)])
def test_a_run_that_never_overfits_stops_after_max_stages(flags, stages):
    tasks, curves = ["a", "b"], {t: (50.0, 0.0, 1.0, 0.0, 0.01) for t in ("a", "b")}  # rising until 50 epochs
    hooks = Hooks(tasks, curves)
    state = msft.run_msft(tasks, hooks, budget=1.0, interval=0.5, store=msft.SnapshotStore(), **flags)
    kinds = [e.get("kind", e["event"]) for e in hooks.events if e["event"] in ("decision", "end")]
    assert kinds == ["no_drop"] * stages + ["end"]
    assert state.epoch == min(stages * 1.0, flags.get("max_epochs", 99)) and state.active == tasks


def test_memory_store_cannot_resume():
    tasks, curves = ["a", "b"], {"a": (1.0, 0.0, 1.0, 0.0, 0.01), "b": (0.5, 0.0, 1.0, 0.0, 0.01)}
    hooks = Hooks(tasks, curves)
    train = hooks.train

    def train_until_075(active, origin, until):  # killed after the checkpoint at 0.75, where b's peak must live
        if hooks.x.sum() >= 1.5:
            raise Killed
        train(active, origin, until)
    hooks.train = train_until_075
    with pytest.raises(Killed):
        msft.run_msft(tasks, hooks, budget=1, interval=0.25, max_epochs=2, store=msft.SnapshotStore())
    state, x, n, _ = hooks.saved
    assert state["epoch"] == 0.75
    with pytest.raises(FileNotFoundError, match=r"SnapshotStore\(memory\): snapshot 2 is missing"):
        msft.run_msft(tasks, Hooks(tasks, curves, x=x), budget=1, interval=0.25, max_epochs=2,
                      store=msft.SnapshotStore(), state=msft.LoopState.from_json(state))


# -----------------------------------------------------------------------------
# restart

def run_killed(tasks, curves, flags, folder, kills):
    """Run with a kill at each of `kills` ((hook, n): the n-th call of that hook in that attempt), resuming each
    time from the last completed hooks.checkpoint (state, model, log length) and the store reopened from disk."""
    saved, events = None, []  # as of the last hooks.checkpoint that completed
    for kill in kills + [None]:
        state, x, n, segment = saved or (None, None, 0, None)
        store = msft.SnapshotStore(folder)
        hooks = Hooks(tasks, curves, store, x=x, events=events[:n], kill_at=kill, segment=segment)
        try:
            return hooks, store, msft.run_msft(tasks, hooks, store=store, **flags,
                                               state=msft.LoopState.from_json(state) if state else None)
        except Killed:
            saved, events = hooks.saved or saved, hooks.events


def assert_same_run(a, b):
    (hooks, store, state), (hooks2, store2, state2) = a, b
    assert hooks.events == hooks2.events  # the log reads as the uninterrupted run's: no event missing or twice
    assert state.to_json() == state2.to_json()
    assert torch.equal(hooks.x, hooks2.x)
    assert store.ids() == store2.ids() and store.meta == store2.meta
    for i in store.ids():
        assert torch.equal(store.load(i)["x"], store2.load(i)["x"])


HOOKS = ["train", "evaluate", "snapshot", "restore", "log", "checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("eval_excluded", ["every", "rollback"])
def test_a_kill_at_every_hook_call_resumes_exactly(tmp_path, eval_excluded):
    tasks = ["a", "b", "c"]
    curves = {"a": (0.5, 0.0, 1.0, 0.0, 0.01), "b": (1.25, 0.3, 1.0, 0.02, 0.01), "c": (50.0, 0.0, 0.1, 0.0, 0.1)}
    flags = dict(budget=1.0, interval=0.25, max_epochs=2.5, ties="all", eval_excluded=eval_excluded)
    whole = run_killed(tasks, curves, flags, tmp_path / "whole", [])
    kinds = [e.get("kind", e["event"]) for e in whole[0].events if e["event"] in ("decision", "end")]
    assert kinds == ["drop", "drop", "no_drop", "no_drop", "end"]
    for hook in HOOKS:
        for n in range(1, whole[0].calls[hook] + 1):
            assert_same_run(run_killed(tasks, curves, flags, tmp_path / f"{hook}{n}", [(hook, n)]), whole)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(sims(), st.sampled_from(["all", "first"]), st.sampled_from(["every", "rollback"]),
       st.lists(st.tuples(st.sampled_from(HOOKS), st.floats(0, 1, exclude_max=True)), min_size=1, max_size=3))
def test_kills_and_resumes_equal_the_uninterrupted_run(sim, ties, eval_excluded, kills):
    tasks, curves, budget, interval, bounds = sim
    flags = dict(budget=budget, interval=interval, **bounds, ties=ties, eval_excluded=eval_excluded)
    with tempfile.TemporaryDirectory() as tmp:
        whole = run_killed(tasks, curves, flags, Path(tmp) / "whole", [])
        kills = [(hook, 1 + int(f * whole[0].calls.get(hook, 0))) for hook, f in kills]
        assert_same_run(run_killed(tasks, curves, flags, Path(tmp) / "killed", kills), whole)
