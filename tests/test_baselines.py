"""baselines.py on a small copy of the demo mixture (48 training rows a task), each method through train.train, its
log checked against its rule by a replay written here: continual trains one task a phase and rolls back to that
task's earliest best; SRO drops each task at the peak found in the search's evaluations, and its search run here and
one read from an SFT log give the same second run; Soft SRO samples with peak / mean weights; IES leaves out exactly
the examples whose loss histories pass the rule, measures their losses forward-only, and its per-example losses and
gradient equal a one-example-at-a-time computation; DynamixSFT's probabilities are the bandit update recomputed from
the logged rewards, and baselines.lookahead is one plain gradient step by hand (and by transformers on the real SmolLM2
checkpoint and real rows). Every method's FLOPs equal the hand count 6N train + 2N forward + 8N look-ahead + 2N
eval tokens (+ the search run's), and a run killed right after a checkpoint resumes to the same log."""
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cut_mixture, write_jsonl
import baselines
import data
import hub
import msft
import prepare
import runfolder
import train
from demo import DEMO_MODEL
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--interval", "0.25", "--signal", "loss", "--eval-limit", "16", "--batch-size", "12", "--micro-batch", "8",
         "--shots", "0", "--max-new-tokens", "4", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def mix(demo_data, tmp_path_factory):
    """The demo's four tasks cut to 48 training, 16 selection and 8 test rows each (16 steps an epoch at batch 12)."""
    return cut_mixture(demo_data, tmp_path_factory.mktemp("mix") / "mix", 48, 16, 8)


def run_train(out, mix, method, *extra):
    args = train.parse_args(["--method", method, "--out", str(out), *SMALL, *extra])
    return train.train(args, mix / "model", mix)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def n_params(mix):
    return sum(p.numel() for p in train.Transformer.from_pretrained(mix / "model").parameters())


def spy(monkeypatch, cls, name, record):
    """Wrap cls.name so that record(self, args, result) sees every call."""
    orig = getattr(cls, name)

    def wrapper(self, *args, **kw):
        out = orig(self, *args, **kw)
        record(self, args, out)
        return out
    monkeypatch.setattr(cls, name, wrapper)


def check_common(log, final, mix, stages, search_flops=None):
    """What every method owes: every task evaluated at every checkpoint, SFT's eval fields, the chosen checkpoint the
    best average among `stages`' evaluations (the earliest on ties), FLOPs equal to the hand count of the log."""
    tasks = sorted(data.load_mixture(mix))
    evals = [e for e in log if e["event"] == "eval"]
    for e in evals:
        assert {"stage", "epoch", "active", "evaluated", "scores", "avg", "snapshots_held", "eval_tokens"} <= set(e)
        assert e["evaluated"] == tasks and sorted(e["scores"]) == tasks
        assert e["avg"] == pytest.approx(sum(e["scores"].values()) / len(tasks), abs=1e-12)
    chosen = [e for e in evals if e["stage"] in stages]
    best = max(chosen, key=lambda e: e["avg"])  # max keeps the first of equals
    assert (final["best_epoch"], final["best_avg"]) == (best["epoch"], best["avg"])
    n = n_params(mix)
    tok = lambda key, event: sum(e.get(key, 0) for e in log if e["event"] == event)
    hand = {"train": 6 * n * tok("tokens", "train") + 2 * n * tok("forward_tokens", "ies")
            + 8 * n * tok("lookahead_tokens", "dynamix"), "eval": 2 * n * tok("eval_tokens", "eval"),
            "paper_eval": 2 * n * sum(sum(e["paper_tokens"].values()) for e in evals)}  # every task, every time
    if search_flops:
        hand = {k: v + search_flops[k] for k, v in hand.items()}
    done = [e for e in log if e["event"] == "end"]
    assert len(done) == 1 and log[-1]["event"] == "final"
    for flops in (done[0]["flops"], final["flops"]):
        assert {k: flops[k] for k in hand} == hand
    assert final["flops"]["test"] > 0  # the report on the test split, apart from the method's cost


# -----------------------------------------------------------------------------
# continual SFT

def test_continual_trains_one_task_a_phase_and_rolls_back_to_its_best(tmp_path, mix, monkeypatch):
    order = ["sum", "key", "code", "first"]
    batches, loads = [], []
    spy(monkeypatch, baselines.Sampler, "next_batch", lambda s, a, out: batches.append(sorted({t for t, _ in out})))
    spy(monkeypatch, msft.SnapshotStore, "load", lambda s, a, out: loads.append(a[0]))
    final = run_train(tmp_path, mix, "continual", "--budget", "0.5", "--task-order", *order)
    log = read_log(tmp_path)
    check_common(log, final, mix, stages={1, 2, 3, 4})
    # one task per batch, the phases in --task-order, each a contiguous run of batches
    assert all(len(b) == 1 for b in batches)
    phases = [b[0] for k, b in enumerate(batches) if k == 0 or b != batches[k - 1]]
    assert phases == order
    # replay: phase k's candidates are its start (the previous roll-back target, already evaluated) and its evals
    evals = [e for e in log if e["event"] == "eval"]
    decisions = [e for e in log if e["event"] == "decision" and e["kind"] == "next_task"]
    start, targets = None, []
    for k, task in enumerate(order):
        phase = [e for e in evals if e["stage"] == k + 1]
        assert all(e["active"] == [task] for e in phase)
        assert [e["epoch"] for e in phase] == \
               [(start["epoch"] if start else 0.0) + j * 0.25 for j in range(0 if start is None else 1, 3)]
        cands = ([start] if start else []) + phase
        best = max(cands, key=lambda e: e["scores"][task])  # the first of equals: the earliest
        assert decisions[k]["task"] == task and decisions[k]["rollback_epoch"] == best["epoch"]
        start = best
        targets.append(evals.index(best))  # checkpoint ids count the evaluations
        assert all(e["snapshots_held"] <= 2 for e in phase)
    # the store gave back each phase's roll-back target (the last task's best: the final model), then the chosen
    # checkpoint for the test split when it is another
    chosen = evals.index(max(evals, key=lambda e: e["avg"]))
    assert loads == targets + ([chosen] if chosen != targets[-1] else [])
    assert final["final_epoch"] == start["epoch"]


# -----------------------------------------------------------------------------
# SRO and Soft SRO

def brute_peaks(evals):
    tasks = sorted(evals[0]["scores"])
    return {t: max(evals, key=lambda e: e["scores"][t])["epoch"] for t in tasks}


@pytest.fixture(scope="module")
def sft_log(mix, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_train(out, mix, "sft", *SEARCH)
    return out / "log.jsonl"


SEARCH = ["--max-epochs", "2", "--lr", "2e-2"]  # the four tasks peak at three different epochs


def test_sro_drops_each_task_at_its_searched_peak(tmp_path, mix, sft_log, monkeypatch):
    batches = []
    spy(monkeypatch, baselines.Sampler, "next_batch", lambda s, a, out: batches.append({t for t, _ in out}))
    final = run_train(tmp_path / "here", mix, "sro", *SEARCH)
    log = read_log(tmp_path / "here")
    check_common(log, final, mix, stages={1})
    search_evals = [e for e in log if e["event"] == "eval" and e["stage"] == 0]
    peaks = brute_peaks(search_evals)
    assert len(set(peaks.values())) > 1, f"the tasks should peak apart for this test to bite: {peaks}"
    (search,) = [e for e in log if e.get("kind") == "search"]
    assert search["peaks"] == peaks and search["source"] == "this run"
    # the search run here is the SFT run (same base, same sampler, same seed): the same evaluations
    sft = [e for e in (json.loads(line) for line in sft_log.read_text().splitlines()) if e["event"] == "eval"]
    assert [(e["epoch"], e["scores"]) for e in search_evals] == [(e["epoch"], e["scores"]) for e in sft]
    # phase (ii): a task is trained until the checkpoint at its peak epoch, then dropped there
    second = log[log.index(search) + 1:]
    drops = {t: e["epoch"] for e in second if e.get("kind") == "drop" for t in e["excluded"]}
    assert drops == peaks
    trained = iter(batches[len([e for e in log[:log.index(search)] if e["event"] == "train"]):])
    dropped = set()
    for e in second:
        if e["event"] == "eval":
            assert e["active"] == sorted(t for t in peaks if t not in dropped)
        elif e["event"] == "decision" and e["kind"] == "drop":
            dropped |= set(e["excluded"])
        elif e["event"] == "train":
            assert not next(trained) & dropped
    # until the first drop the second run repeats the search: the model and the sampler were reset
    first_drop = min(peaks.values())
    again = [(e["epoch"], e["scores"]) for e in second if e["event"] == "eval" and e["epoch"] <= first_drop]
    assert again == [(e["epoch"], e["scores"]) for e in search_evals if e["epoch"] <= first_drop]

    # the same from the SFT run's log: the same second run, its FLOPs counted from that log's final event
    final2 = run_train(tmp_path / "log", mix, "sro", *SEARCH, "--search-log", str(sft_log))
    log2 = read_log(tmp_path / "log")
    sft_final = json.loads(sft_log.read_text().splitlines()[-1])
    check_common(log2, final2, mix, stages={1}, search_flops=sft_final["flops"])
    strip = lambda evs: [(e["event"], e.get("epoch"), e.get("scores"), e.get("excluded"))
                         for e in evs if e["event"] in ("eval", "decision")]
    assert strip(log2[1:]) == strip(second)


@pytest.fixture(scope="module")
def uneven(demo_data, tmp_path_factory):
    """The demo's tasks cut to unequal sizes, as a user's mixture has them: code 48, first 24, key 36, sum 12
    training rows (120 an epoch: 10 steps of 12)."""
    return cut_mixture(demo_data, tmp_path_factory.mktemp("uneven") / "mix", (48, 24, 36, 12), 16, 8)


@pytest.fixture(scope="module")
def uneven_sft_log(uneven, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-uneven")
    run_train(out, uneven, "sft", *UNEVEN_SEARCH)
    return out / "log.jsonl"


UNEVEN_SEARCH = ["--max-epochs", "3", "--lr", "1e-2"]  # on `uneven` the tasks peak at 2.5, 2.75 and 3


def hand_quota(sizes, weights):
    """Soft SRO's examples a task in one pass, restated: n_i proportional to size_i x w_i, summing to the epoch's
    examples, the rounding's remainders handed to the largest fractions."""
    total = sum(sizes.values())
    exact = {t: total * sizes[t] * weights[t] / sum(sizes[u] * weights[u] for u in sizes) for t in sizes}
    out = {t: math.floor(x) for t, x in exact.items()}
    for t in sorted(sizes, key=lambda t: out[t] - exact[t])[:total - sum(out.values())]:
        out[t] += 1
    return out


def epochs_of(steps, per_epoch):
    return [steps[k:k + per_epoch] for k in range(0, len(steps), per_epoch)]


def test_soft_sro_samples_by_peak_over_mean_peak_on_top_of_size(tmp_path, uneven, uneven_sft_log, monkeypatch):
    weights, steps = [], []
    spy(monkeypatch, baselines.Sampler, "set_weights", lambda s, a, out: weights.append(a[0]))
    spy(monkeypatch, baselines.Sampler, "next_batch", lambda s, a, out: steps.append(list(out)))
    final = run_train(tmp_path, uneven, "soft-sro", *UNEVEN_SEARCH, "--search-log", str(uneven_sft_log))
    log = read_log(tmp_path)
    sft = [json.loads(line) for line in uneven_sft_log.read_text().splitlines()]
    check_common(log, final, uneven, stages={1}, search_flops=sft[-1]["flops"])
    peaks = brute_peaks([e for e in sft if e["event"] == "eval"])
    mean = sum(peaks.values()) / len(peaks)
    expected = {t: p / mean for t, p in peaks.items()}
    assert len(set(expected.values())) > 1, "the tasks should peak apart for this test to bite"
    (logged,) = [e for e in log if e.get("kind") == "weights"]
    assert logged["weights"] == pytest.approx(expected, abs=1e-12)
    assert weights and all(w == logged["weights"] for w in weights)
    sizes = {"code": 48, "first": 24, "key": 36, "sum": 12}
    quota = hand_quota(sizes, expected)
    assert logged["passes_per_epoch"] == pytest.approx({t: quota[t] / sizes[t] for t in sizes})
    # every epoch of the second run trains each task its quota: its size times its weight, not its weight alone
    for epoch in epochs_of(steps, 10):
        assert Counter(t for b in epoch for t, _ in b) == quota
    assert len(steps) == 30  # the search's 3 epochs
    evals = [e for e in log if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [j * 0.25 for j in range(13)]


def test_soft_sro_with_equal_weights_trains_exactly_what_sft_trains(tmp_path, uneven, uneven_sft_log, monkeypatch):
    """A search in which every task peaks at the same epoch gives every task the weight 1: the second run must then
    train every example once an epoch, as SFT does, however unequal the tasks' sizes."""
    flat = tmp_path / "flat.jsonl"
    lines = []
    for e in map(json.loads, uneven_sft_log.read_text().splitlines()):
        if e["event"] == "eval":
            e["scores"] = {t: -abs(e["epoch"] - 1.0) for t in e["scores"]}
        lines.append(json.dumps(e) + "\n")
    flat.write_text("".join(lines))
    steps = []
    spy(monkeypatch, baselines.Sampler, "next_batch", lambda s, a, out: steps.append(list(out)))
    run_train(tmp_path / "run", uneven, "soft-sro", *UNEVEN_SEARCH, "--search-log", str(flat))
    (logged,) = [e for e in read_log(tmp_path / "run") if e.get("kind") == "weights"]
    assert logged["weights"] == {t: 1.0 for t in logged["weights"]} and set(logged["passes_per_epoch"].values()) == {1}
    every = sorted((t, i) for t, n in {"code": 48, "first": 24, "key": 36, "sum": 12}.items() for i in range(n))
    for epoch in epochs_of(steps, 10):
        assert sorted(x for b in epoch for x in b) == every


# -----------------------------------------------------------------------------
# IES

def reference_ies(losses, moving_average_rate, threshold, k=1):
    """The reference code's test (tmllab/2025_ICLR_IES, cifar_main.py), restated: a second difference per epoch
    once there are 3 losses, the last moving_average_rate + k of them kept, and with that many the sum of the last
    k moving averages (window moving_average_rate) of their absolute values against the threshold."""
    derivatives = []
    for t in range(3, len(losses) + 1):
        x = losses[:t]
        derivatives = (derivatives + [x[-1] - 2 * x[-2] + x[-3]])[-(moving_average_rate + k):]
    if len(derivatives) < moving_average_rate + k:
        return False
    a = np.abs(derivatives)
    ma = [a[i - moving_average_rate + 1:i + 1].mean() for i in range(moving_average_rate - 1, len(a))]
    return float(np.abs(ma[-k:]).sum()) < threshold


def test_ies_rule_against_the_reference_code():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n, w = int(rng.integers(0, 9)), int(rng.integers(1, 4))
        h = list(rng.choice([0.5, 0.5005, 0.501, 0.7, 1.0], size=n) + rng.normal(0, 1e-4, size=n) * rng.integers(0, 2))
        thr = float(rng.choice([1e-3, 1e-2, 0.3]))
        assert baselines.ies_left_out(h, w, thr) == reference_ies(h, w, thr), (h, w, thr)
    line = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # a straight line: no bend at all, but only after 6 losses (window 3)
    assert baselines.ies_left_out(line, 3, 1e-3) and not baselines.ies_left_out(line[:5], 3, 1e-3)
    assert not baselines.ies_left_out([1.0, 0.5, 0.4, 0.35, 0.33, 0.32], 3, 1e-3)


def test_ies_records_each_trained_and_measured_loss(tmp_path, mix):
    """A training step hands each example's mean answer loss to Run.on_losses, and baselines.measure gives the
    left-out examples' by a forward-only pass: both equal a one-example-at-a-time computation through the model as
    it was."""
    args = train.parse_args(["--method", "ies", "--out", str(tmp_path), *SMALL])
    run = train.Run(args, mix / "model", mix)
    runfolder.open_log(run)
    saved = run.sampler.state_dict()
    batch = run.sampler.next_batch()
    run.sampler.load_state_dict(saved)
    left = [("key", 3), ("sum", 5), ("first", 0)]
    recorded = {}
    run.on_losses.append(lambda items, losses: recorded.update(
        {x: recorded.get(x, []) + [loss] for x, loss in zip(items, losses)}))
    model = train.Transformer.from_pretrained(mix / "model")

    def by_hand(items):
        out = {}
        for t, i in items:
            ids, labels = run.train_enc[t][i]
            target = torch.tensor(labels[1:])
            logits = model(torch.tensor([ids[:-1]]))[0]
            out[t, i] = F.cross_entropy(logits[target != -100], target[target != -100]).item()
        return out
    with torch.no_grad():
        want = {**by_hand(batch), **by_hand(left)}
    items, losses, measured = baselines.measure(run, left)
    recorded.update({x: recorded.get(x, []) + [loss] for x, loss in zip(items, losses)})
    run.train_step()
    for (t, i), loss in want.items():
        assert len(recorded[t, i]) == 1
        assert recorded[t, i][0] == pytest.approx(loss, rel=1e-5)
    assert sum(map(len, recorded.values())) == len(batch) + len(left)
    length = lambda xs: sum(len(run.train_enc[t][i][0]) - 1 for t, i in xs)
    assert measured == length(left) == run.flops.tokens["forward"]
    assert run.flops.tokens["train"] == length(batch)


def test_ies_leaves_out_exactly_the_examples_under_the_threshold(tmp_path, mix, monkeypatch):
    states, steps = [], []
    spy(monkeypatch, train.Run, "checkpoint", lambda s, a, out: states.append(json.loads(json.dumps(a[0]))))
    spy(monkeypatch, baselines.Sampler, "next_batch", lambda s, a, out: steps.append(list(out)))
    w, thr = 1, 0.3
    final = run_train(tmp_path, mix, "ies", "--max-epochs", "6", "--interval", "0.5", "--ies-window", str(w),
                      "--ies-threshold", str(thr), "--ies-rule", "reference")
    log = read_log(tmp_path)
    check_common(log, final, mix, stages={1})
    ies = [e for e in log if e["event"] == "ies"]
    assert [e["epoch"] for e in ies] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [e["left_out"] for e in ies[:3]] == [0, 0, 0]  # window 1 needs 4 losses: none can leave before
    assert 0 < ies[4]["left_out"] < ies[4]["examples"], "some but not all examples should leave for this test to bite"
    skip, n_eval, n_train, in_epoch = set(), 0, 0, []
    for e in log:
        if e["event"] == "eval":
            n_eval += 1
        elif e["event"] == "ies":
            # an epoch is one pass over the examples not left out, in full batches of 12 but its last
            assert sorted(x for b in in_epoch for x in b) == sorted((t, i) for t in sorted(data.load_mixture(mix))
                                                                    for i in range(48) if (t, i) not in skip)
            assert [len(b) for b in in_epoch[:-1]] == [12] * (len(in_epoch) - 1)
            in_epoch = []
            state = states[n_eval - 1]  # checkpointed right after this evaluation
            for t, hists in state["losses"].items():
                # every example's loss was recorded once an epoch, trained or not (the rule keeps the last w + 3)
                assert all(len(h) == min(e["epoch"], w + 3) for h in hists)
                want = [i for i, h in enumerate(hists) if reference_ies(h, w, thr)]
                assert state["left_out"][t] == want and e["by_task"][t] == len(want)
            skip = {(t, i) for t, ids in state["left_out"].items() for i in ids}
        elif e["event"] == "train":
            in_epoch.append(steps[n_train])
            assert not set(steps[n_train]) & skip
            n_train += 1
    assert n_train == len(steps)
    left = sum(e["left_out"] for e in ies[:-1])
    assert n_train == sum(math.ceil((192 - e["left_out"]) / 12) for e in [{"left_out": 0}] + ies[:-1]) and left > 0


def test_ies_paper_rule_leaves_examples_out_from_the_third_epoch_and_costs_less_than_sft(tmp_path, mix, monkeypatch):
    """The mSFT paper's IES (the default): every example's history starts with the base model's loss, measured
    forward-only, so the rule (the last |second difference| under the threshold) can first leave examples out of the
    3rd epoch; the run then trains fewer examples than SFT, and costs less, evaluations alike."""
    states = []
    spy(monkeypatch, train.Run, "checkpoint", lambda s, a, out: states.append(json.loads(json.dumps(a[0]))))
    flags = ["--max-epochs", "6", "--interval", "1", "--ies-threshold", "0.3"]
    final = run_train(tmp_path / "ies", mix, "ies", *flags)
    log = read_log(tmp_path / "ies")
    check_common(log, final, mix, stages={1})
    ies = [e for e in log if e["event"] == "ies"]
    assert [e["epoch"] for e in ies] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    n = sum(len(ids) - 1 for t, rows in baselines_rows(mix).items() for ids, _ in rows)
    assert ies[0]["forward_tokens"] == n  # the base model's loss of every training example
    evals_seen = 0
    for e in log:
        evals_seen += e["event"] == "eval"
        if e["event"] == "ies" and e["epoch"] >= 1:
            state = states[evals_seen - 1]
            for t, hists in state["losses"].items():
                assert all(len(h) == min(e["epoch"] + 1, 3) for h in hists)  # the base's, then one an epoch
                want = [i for i, h in enumerate(hists) if len(h) == 3 and abs(h[2] - 2 * h[1] + h[0]) < 0.3]
                assert state["left_out"][t] == want
    assert ies[1]["left_out"] == 0 and sum(e["left_out"] for e in ies) > 0
    sft = run_train(tmp_path / "sft", mix, "sft", *flags)
    assert final["flops"]["train"] < sft["flops"]["train"] and final["flops"]["total"] < sft["flops"]["total"]


# -----------------------------------------------------------------------------
# DynamixSFT

def test_lookahead_is_one_plain_gradient_step_then_restored(tmp_path, mix):
    args = train.parse_args(["--method", "dynamix", "--out", str(tmp_path), *SMALL])
    run = train.Run(args, mix / "model", mix)
    items = [("key", 0), ("key", 7), ("key", 30)]
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    pre, post, tokens = baselines.lookahead(run, items)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in run.model.parameters())
    # by hand: per-example mean answer loss; one step of -lr x the gradient of the batch's loss over answer tokens
    model = train.Transformer.from_pretrained(mix / "model")
    rows = [run.train_enc[t][i] for t, i in items]

    def losses():
        out = []
        for ids, labels in rows:
            target = torch.tensor(labels[1:])
            logits = model(torch.tensor([ids[:-1]]))[0]
            out.append((F.cross_entropy(logits[target != -100], target[target != -100], reduction="sum"),
                        (target != -100).sum()))
        return out
    first = losses()
    (sum(ce for ce, _ in first) / sum(n for _, n in first)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        second = losses()
    torch.testing.assert_close(pre, torch.stack([ce / n for ce, n in first]).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(post, torch.stack([ce / n for ce, n in second]), rtol=1e-4, atol=1e-6)
    assert (post < pre).all()  # the step helps the batch it was taken on
    assert tokens == sum(len(ids) - 1 for ids, _ in rows)


def test_lookahead_rewards_at_lr_1e5_are_fp32_ones_under_bf16_autocast(tmp_path, mix):
    """At the paper's lr a one-step look-ahead moves each loss by about 1e-5 of itself: under bf16 autocast that is
    below the losses' own rounding, so the rewards must come from fp32 whatever the training precision."""
    items = [("key", i) for i in range(8)]
    rewards = {}
    for autocast in ("mixed", "fp32"):
        args = train.parse_args(["--method", "dynamix", "--out", str(tmp_path), *SMALL, "--lr", "1e-5",
                                 "--precision", autocast])
        run = train.Run(args, mix / "model", mix)
        assert (autocast == "mixed") == isinstance(run.autocast, torch.autocast)
        pre, post, _ = baselines.lookahead(run, items)
        rewards[autocast] = (pre - post) / pre
    torch.testing.assert_close(rewards["mixed"], rewards["fp32"], rtol=1e-5, atol=1e-10)
    assert rewards["fp32"].abs().min() > 0
    # the same two losses under bf16 autocast, as the look-ahead computed them before: mostly rounding
    model = train.Transformer.from_pretrained(mix / "model")
    idx, targets = data.collate([run.train_enc[t][i] for t, i in items], run.eos)
    with torch.autocast("cpu", torch.bfloat16):
        pre = model(idx, targets)
        (pre.sum() / (targets != -100).sum()).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-5 * p.grad
            post = model(idx, targets)
    bf16 = ((pre - post) / pre).detach()
    assert (bf16 - rewards["fp32"]).abs().max() > 0.5 * rewards["fp32"].abs().max()  # ~100% off


def test_dynamix_probabilities_are_the_bandit_update_of_the_logged_rewards(tmp_path, uneven, monkeypatch):
    weights = []
    spy(monkeypatch, baselines.Sampler, "set_weights", lambda s, a, out: weights.append(a[0]))
    final = run_train(tmp_path, uneven, "dynamix", "--max-epochs", "1", "--dynamix-every", "2")
    log = read_log(tmp_path)
    check_common(log, final, uneven, stages={1})
    updates = [e for e in log if e["event"] == "dynamix"]
    assert [e["step"] for e in updates] == [0, 2, 4, 6, 8]  # 10 steps, a look-ahead every 2
    sizes = {"code": 48, "first": 24, "key": 36, "sum": 12}
    tasks = sorted(sizes)
    p0 = np.array([sizes[t] / 120 for t in tasks])  # the prior: each task's share of the mixture
    q = np.zeros(len(tasks))
    for e in updates:
        r = np.array([e["rewards"][t] for t in tasks])
        q = 0.95 * q + 0.05 * (r - r.min()) / (r.max() - r.min())
        p = np.exp(4 * q) * p0
        p = 0.7 * p / p.sum() + 0.3 / 4
        assert [e["q"][t] for t in tasks] == pytest.approx(list(q), abs=1e-12)
        assert [e["weights"][t] for t in tasks] == pytest.approx(list(p), abs=1e-12)
        assert sum(e["weights"].values()) == pytest.approx(1, abs=1e-12)
        assert e["weights"] in weights  # handed to the sampler
        # the default look-ahead (128 a task) takes every row of these small tasks
        rows = baselines_rows(uneven)
        assert e["lookahead_tokens"] == sum(len(ids) - 1 for t in tasks for ids, _ in rows[t])
    assert len({tuple(sorted(e["weights"].items())) for e in updates}) > 1  # they move with the rewards


def baselines_rows(mix):
    run = train.Run(train.parse_args(["--out", str(mix / "unused"), *SMALL]), mix / "model", mix)
    return run.train_enc


@pytest.mark.slow
def test_dynamix_look_ahead_costs_what_the_paper_says_on_its_mixture_shape(tmp_path, demo_data):
    """The mSFT paper's Appendix F: DynamixSFT's look-ahead cost 94.9% of its training FLOPs on average, over ten
    tasks of 1,800 examples, batch 64, 10 epochs, a look-ahead every 1% of the steps. The default --dynamix-batch
    (128 a task) costs that: 101 look-aheads x 10 tasks x 128 examples x 8 N against 18,000 x 10 x 6 N, 0.958."""
    tasks = [f"t{k}" for k in range(10)]
    manifest = {"tasks": {t: {"sizes": {"train": 1800, "selection": 1, "test": 1}} for t in tasks}}
    for t in tasks:
        for split, n in (("train", 1800), ("selection", 1), ("test", 1)):
            write_jsonl(tmp_path / "mix" / t / f"{split}.jsonl",
                        [{"question": f"{t} {i % 10}", "answer": "A", "choices": ["a", "b"]} for i in range(n)])
    (tmp_path / "mix" / "manifest.json").write_text(json.dumps(manifest))
    tiny = Transformer(ModelConfig(**{**DEMO_MODEL, "dim": 32, "n_layers": 1, "head_dim": 8, "hidden_dim": 64}))
    hub.save_pretrained(tiny, tmp_path / "tiny", copy=sorted((demo_data / "model").glob("tokenizer*")))
    args = train.parse_args(["--method", "dynamix", "--out", str(tmp_path / "run"), "--interval", "1", "--signal",
                             "loss", "--shots", "0", "--micro-batch", "64", "--lr", "1e-4", "--progress", "0"])
    f = train.train(args, tmp_path / "tiny", tmp_path / "mix")["flops"]
    share = f["lookahead"] / (f["train"] - f["lookahead"])
    assert 0.93 < share < 0.99, share


# -----------------------------------------------------------------------------
# resume, and bad input

class Killed(Exception):
    pass


@pytest.mark.parametrize("method, flags, kill_at", [
    ("continual", ["--budget", "0.5"], 3),  # right after the first task's roll-back decision
    ("ies", ["--max-epochs", "6", "--interval", "0.5", "--ies-window", "1", "--ies-threshold", "0.3"], 11),
    ("dynamix", ["--max-epochs", "1", "--dynamix-every", "2"], 3),
])
@pytest.mark.slow
def test_killed_after_a_checkpoint_resumes_to_the_same_log(tmp_path, mix, monkeypatch, method, flags, kill_at):
    run_train(tmp_path / "ref", mix, method, *flags)
    calls = []

    def kill(self, args, out):
        calls.append(1)
        if len(calls) == kill_at:  # after the state is written, before the store's update: the narrowest point
            raise Killed
    with monkeypatch.context() as m:
        spy(m, train.Run, "checkpoint", kill)
        with pytest.raises(Killed):
            run_train(tmp_path / "run", mix, method, *flags)
    run_train(tmp_path / "run", mix, method, *flags, "--resume")
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("tok_per_s", "time")} for e in log]
    assert strip(read_log(tmp_path / "ref")) == strip(read_log(tmp_path / "run"))


def test_bad_input_fails_naming_it(tmp_path, mix, capsys):
    for flags, message in [(["--method", "sft", "--search-log", "x"], "--search-log is for --method sro or soft-sro"),
                           (["--method", "ies", "--ies-window", "0"], "argument --ies-window: expected a finite int >= 1"),
                           (["--method", "sft", "--task-order", "a"], "--task-order is for --method continual"),
                           (["--method", "dynamix", "--dynamix-batch", "0"], "argument --dynamix-batch: expected a finite int >= 1")]:
        with pytest.raises(SystemExit):
            train.parse_args(flags)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--task-order sum key: expected each of the run's tasks"):
        run_train(tmp_path / "a", mix, "continual", "--task-order", "sum", "key")
    with pytest.raises(SystemExit, match="--search-log .*nope.jsonl: not a file"):
        run_train(tmp_path / "b", mix, "sro", "--search-log", str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    ev = {"event": "eval", "stage": 0, "epoch": 0.0, "scores": {"code": -1.0, "first": -1.0}}
    bad.write_text(json.dumps(ev) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: expected an SFT evaluation \(stage 0, an epoch, scores"):
        run_train(tmp_path / "c", mix, "soft-sro", "--search-log", str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: not a log event"):
        run_train(tmp_path / "d", mix, "sro", "--search-log", str(bad))
    scores = {t: -1.0 for t in ("code", "first", "key", "sum")}
    bad.write_text(json.dumps({**ev, "scores": scores}) + "\n" + json.dumps({"event": "train", "tokens": 10}) + "\n"
                   + json.dumps({"event": "final", "flops": {"train": 61, "eval": 0, "total": 61}}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl: its FLOPs .* are not those of this model"):
        run_train(tmp_path / "e", mix, "sro", "--search-log", str(bad))


def test_lookahead_on_smollm2_real_rows_matches_transformers(tmp_path, smollm2, shared_data):
    """The per-example loss IES and DynamixSFT use, and the look-ahead step, on the real checkpoint and real rows,
    against transformers' own loss (mean cross-entropy over the labels that are not -100) and a step taken on it."""
    transformers = pytest.importorskip("transformers")
    prepare.prepare(str(shared_data), tmp_path / "mix", tasks=["arc_easy"], n_train=4, n_selection=1, n_test=1, seed=20)
    args = train.parse_args(["--method", "dynamix", "--model", str(smollm2), "--data", str(tmp_path / "mix"),
                             "--out", str(tmp_path / "run"), "--lr", "1e-3", "--batch-size", "4", "--micro-batch", "4"])
    run = train.Run(args, smollm2, tmp_path / "mix")
    items = [("arc_easy", i) for i in range(4)]
    pre, post, tokens = baselines.lookahead(run, items)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    rows = [run.train_enc[t][i] for t, i in items]
    n = torch.tensor([sum(l != -100 for l in labels[1:]) for _, labels in rows])

    def losses():
        return torch.stack([hf(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
                            for ids, labels in rows])
    first = losses()
    ((first * n).sum() / n.sum()).backward()
    with torch.no_grad():
        for p in hf.parameters():
            p -= 1e-3 * p.grad
        second = losses()
    torch.testing.assert_close(pre, first.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(post, second, rtol=1e-4, atol=1e-5)
    assert ((pre - post) / pre).abs().min() > 1e-3  # the step moved the losses well beyond the tolerance
    assert tokens == sum(len(ids) - 1 for ids, _ in rows)
