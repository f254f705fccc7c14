"""train.py end to end on the CPU: mSFT's logged decisions are exactly msft.decide's on the logged scores, snapshots
held stay within active tasks + 1, two gloo processes give what one process gives, a run killed at a random
evaluation and resumed ends as an uninterrupted one, bad flags fail at start-up, a NaN loss stops the run, and the
real SmolLM2 checkpoint fine-tunes on real rows and saves a model that transformers loads."""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import assert_trained_alike, cut_mixture
import data
import hub
import msft
import prepare
import runfolder
import train
from demo import DEMO_MODEL
from model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# small: 2 epochs at most, roll-outs of half an epoch, the cheap loss signal, few evaluation examples
SMALL = ["--max-epochs", "2", "--budget", "0.5", "--interval", "0.25", "--signal", "loss", "--eval-limit", "16",
         "--batch-size", "16", "--micro-batch", "8", "--shots", "0", "--max-new-tokens", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data


def run_train(tmp, demo, method, *extra):
    args = train.parse_args(["--method", method, "--out", str(tmp), *SMALL, *extra])
    return train.train(args, demo / "model", demo)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def replay_decisions(log):
    """The decisions msft.decide takes from the eval events' scores, stage by stage."""
    out, stage_hist, active = [], [], None
    for e in log:
        if e["event"] == "eval":
            if active is None:
                active = list(e["active"])
            stage_hist.append({t: e["scores"][t] for t in active})
        elif e["event"] == "decision":
            excluded, i = msft.decide(stage_hist)
            out.append((excluded, i))
            start = stage_hist[i] if i is not None else stage_hist[-1]
            active = [t for t in active if t not in excluded]
            stage_hist = [{t: start[t] for t in active}]
    return out


def test_msft_decisions_are_msft_decide_on_logged_scores(tmp_path, demo):
    demo = cut_mixture(demo, tmp_path / "mix", 100, 16, 16)  # 100 training rows a task: 25 steps an epoch
    final = run_train(tmp_path / "run", demo, "msft")
    log = read_log(tmp_path / "run")
    decisions = [e for e in log if e["event"] == "decision"]
    assert decisions, "the run took no decision"
    evals = [e for e in log if e["event"] == "eval"]
    replay = replay_decisions(log)
    for d, (excluded, i) in zip(decisions, replay):
        assert d["excluded"] == excluded
        assert d["kind"] == ("drop" if excluded else "no_drop")
    for e in evals:
        assert e["snapshots_held"] <= len(e["active"]) + 1
        assert set(e["scores"]) == set(data.load_mixture(demo))  # every task evaluated ("every")
        assert abs(e["avg"] - sum(e["scores"].values()) / len(e["scores"])) < 1e-12
    best = max(evals, key=lambda e: e["avg"])  # the chosen checkpoint is the best average seen (earliest on ties)
    assert final["best_epoch"] == best["epoch"] and final["best_avg"] == best["avg"]
    assert log[-1]["event"] == "final"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_scores"] == final["scores"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_sft_chooses_best_average_and_flops_count_tokens(tmp_path, demo):
    final = run_train(tmp_path / "run", demo, "sft", "--max-epochs", "1")
    log = read_log(tmp_path / "run")
    evals = [e for e in log if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert final["best_avg"] == max(e["avg"] for e in evals)
    n = sum(p.numel() for p in train.Transformer.from_pretrained(demo / "model").parameters())
    train_tokens = sum(e["tokens"] for e in log if e["event"] == "train")
    assert final["flops"]["train"] == 6 * n * train_tokens


def torchrun(out, demo, nproc, *extra):
    # "--" before the script: torchrun would read our --signal as an abbreviation of its --signals-to-handle
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--", str(REPO / "train.py"), "--method", "msft", "--model", str(demo / "model"), "--data", str(demo),
           "--out", str(out), *SMALL, *extra] if nproc > 1 else \
          [sys.executable, str(REPO / "train.py"), "--method", "msft", "--model", str(demo / "model"),
           "--data", str(demo), "--out", str(out), *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, demo):
    one, two = torchrun(tmp_path / "one", demo, 1), torchrun(tmp_path / "two", demo, 2)
    for p in (one, two):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [(e["event"], e.get("kind"), e.get("excluded")) for e in a if e["event"] != "train"] == \
           [(e["event"], e.get("kind"), e.get("excluded")) for e in b if e["event"] != "train"]
    for x, y in zip([e for e in a if e["event"] == "eval"], [e for e in b if e["event"] == "eval"]):
        assert x["epoch"] == y["epoch"]
        for t in x["scores"]:
            assert abs(x["scores"][t] - y["scores"][t]) < 1e-4, (x["epoch"], t)


@pytest.mark.slow
def test_kill_at_a_random_evaluation_and_resume(tmp_path, demo):
    ref = torchrun(tmp_path / "ref", demo, 1)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    evals = sum(e["event"] == "eval" for e in read_log(tmp_path / "ref"))
    k = random.Random(os.getpid()).randrange(2, evals)
    p = torchrun(tmp_path / "run", demo, 1)
    log = tmp_path / "run" / "log.jsonl"
    while p.poll() is None and (not log.exists() or log.read_text().count('"event": "eval"') < k):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    r = torchrun(tmp_path / "run", demo, 1, "--resume")
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out[-3000:]
    a, b = read_log(tmp_path / "ref"), read_log(tmp_path / "run")
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("tok_per_s", "time")} for e in log]
    assert strip(a) == strip(b), f"killed after eval {k}: the resumed log differs from the uninterrupted one"
    assert json.loads((tmp_path / "ref" / "summary.json").read_text())["test_scores"] == \
           json.loads((tmp_path / "run" / "summary.json").read_text())["test_scores"]


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "argument --budget: expected a finite float > 0 and <= 10000.0, got '0'"),
    (["--budget", "1e308"], "argument --budget: expected a finite float > 0 and <= 10000.0, got '1e308'"),
    (["--max-epochs", "inf"], "argument --max-epochs: expected a finite float > 0 and <= 10000.0, got 'inf'"),
    (["--device", "bogus"], "argument --device: expected cpu, cuda or cuda:N, got 'bogus'"),
    (["--fsdp"], "--fsdp shards over ranks: run it under torchrun"),
    (["--grad-clip", "-1"], "argument --grad-clip: expected a finite float >= 0, got '-1'"),
    (["--lr", "nan"], "argument --lr: expected a finite float > 0, got 'nan'"),
    (["--eval-batch", "0"], "argument --eval-batch: expected a finite int >= 1, got '0'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a finite int >= 1, got '0'"),
    (["--progress", "-1"], "argument --progress: expected a finite float >= 0, got '-1'"),
    (["--log-every", "40"], "--log-every is gone: use --progress SECONDS"),
    (["--autocast"], "--autocast is gone: use --precision mixed"),
    (["--micro-batch", "2.5"], "argument --micro-batch: invalid int value: '2.5'"),
    (["--max-stages", "0"], "argument --max-stages: expected a finite int >= 1, got '0'"),
    (["--interval", "2", "--budget", "1"], "--interval must be no larger than --budget"),
    (["--method", "dynamix", "--fsdp"], "--fsdp does not support --method dynamix"),
])
def test_bad_flags_fail_at_start(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_bad_setup_fails_at_start(tmp_path, demo):
    # the demo's smallest task has 300 training rows: a quarter epoch of it alone is 75 examples
    msg = (r"--interval 0.25 of task code alone \(300 training examples\) is 75 examples, less than one --batch-size "
           r"80: use --batch-size 75 or less, or --interval 0.267 or more")
    with pytest.raises(SystemExit, match=msg):
        run_train(tmp_path / "a", demo, "msft", "--batch-size", "80")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["lock"]  # refused before anything was written
    (tmp_path / "empty").mkdir()
    with pytest.raises((SystemExit, ValueError), match="empty"):
        args = train.parse_args(["--out", str(tmp_path / "b"), *SMALL])
        train.train(args, demo / "model", tmp_path / "empty")
    small = tmp_path / "small-vocab"
    hub.save_pretrained(Transformer(ModelConfig(**{**DEMO_MODEL, "vocab_size": 100})), small)
    for f in (demo / "tokenizer").glob("tokenizer*"):
        (small / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="the tokenizer has .* tokens but the model's vocabulary is 100"):
        args = train.parse_args(["--out", str(tmp_path / "c"), *SMALL])
        train.train(args, small, demo)


@pytest.mark.slow
def test_a_nan_stops_exports_the_last_good_model_and_resumes_with_a_smaller_lr(tmp_path, demo, monkeypatch):
    """A diverging step stops the run naming the step; model/ then holds the last committed checkpoint (it loads
    and scores what that evaluation logged), and --resume with a smaller --lr continues, the change logged."""
    real = train.Run.train_step

    def poisoned(self):  # from the 30th step's parameters go NaN, as an lr far too large would make them
        if self.step == 29:
            with torch.no_grad():
                self.model.norm.weight.fill_(float("nan"))
        real(self)
    monkeypatch.setattr(train.Run, "train_step", poisoned)
    with pytest.raises(SystemExit, match=r"the loss is nan at step 30. The last good checkpoint \(epoch 0.25\) is in "
                                         r".*/model; .* --resume --lr 0.0003"):
        run_train(tmp_path, demo, "sft")
    log = read_log(tmp_path)
    assert log[-1]["event"] == "error" and "loss is nan at step 30" in log[-1]["message"]
    last = [e for e in log if e["event"] == "eval"][-1]
    run = train.Run(train.parse_args(["--out", str(tmp_path / "x"), *SMALL]), tmp_path / "model", demo)
    assert run.evaluate(run.tasks) == pytest.approx(last["scores"], abs=1e-6)
    monkeypatch.setattr(train.Run, "train_step", real)
    final = run_train(tmp_path, demo, "sft", "--resume", "--lr", "3e-4")
    log = read_log(tmp_path)
    (change,) = [e for e in log if e["event"] == "change"]
    assert change["lr"] == [3e-3, 3e-4] and final["best_epoch"] >= 0.25
    assert json.loads((tmp_path / "args.json").read_text())["lr"] == 3e-4


def test_smollm2_finetunes_with_msft_on_real_rows(tmp_path, smollm2, shared_data):
    transformers = pytest.importorskip("transformers")
    prepare.prepare(str(shared_data), tmp_path / "mix", tasks=["arc_easy", "openbookqa"], n_train=8, n_selection=4,
                 n_test=4, seed=20)
    args = train.parse_args(["--method", "msft", "--model", str(smollm2), "--data", str(tmp_path / "mix"),
                             "--out", str(tmp_path / "run"), "--max-epochs", "1", "--budget", "0.5",
                             "--interval", "0.5", "--batch-size", "4", "--micro-batch", "4", "--signal", "loss",
                             "--shots", "1", "--max-new-tokens", "8"])
    final = train.train(args, smollm2, tmp_path / "mix")
    assert set(final["scores"]) == {"arc_easy", "openbookqa"}
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert m.config.num_hidden_layers == 30


# -----------------------------------------------------------------------------
# the release's protocol (SPEC 9): exact epochs, loss groups, precision, the final model

@pytest.fixture(scope="module")
def odd(tmp_path_factory, demo):
    """The demo's tasks cut to 37, 29, 45 and 23 training rows: no size, nor their sum (134), is a multiple of a
    batch of 5, so the last step of every epoch is a short one."""
    return cut_mixture(demo, tmp_path_factory.mktemp("odd") / "odd", (37, 29, 45, 23), 8, 8)


ODD = ["--interval", "0.25", "--signal", "loss", "--eval-limit", "8", "--batch-size", "5", "--micro-batch", "3",
       "--shots", "0", "--lr", "3e-3"]


def spy(monkeypatch, cls, name, record):
    orig = getattr(cls, name)

    def wrapper(self, *args, **kw):
        out = orig(self, *args, **kw)
        record(self, args, out)
        return out
    monkeypatch.setattr(cls, name, wrapper)


def path_epochs(log, sizes):
    """(logged epoch, epochs trained on the path to that model) at every evaluation, the second summed from the
    train events' example counts over the size of the mixture being trained; a roll-back returns to the count of
    the checkpoint it restores, and the next stage's mixture is the active tasks left (continual: the next task)."""
    out, at, path, active = [], {}, 0.0, None
    for e in log:
        if e["event"] == "eval":
            active = e["active"] if active is None else active
            at[e["epoch"]] = path
            out.append((e["epoch"], path, sum(sizes[t] for t in active)))
        elif e["event"] == "train":
            path += e["examples"] / sum(sizes[t] for t in active)
        elif e["event"] == "decision":
            if e["kind"] == "next_task":
                active = [e["next_task"]]
            elif e["kind"] == "search":  # SRO's second run starts from the base model, all tasks
                active = sorted(sizes)
            else:
                active = [t for t in active if t not in e["excluded"]]
            back = e.get("rollback_epoch")
            if back is not None:
                path, at = at[back], {k: v for k, v in at.items() if k <= back}
    return out


@pytest.mark.parametrize("method, flags", [
    ("sft", ["--max-epochs", "3"]),
    ("msft", ["--budget", "1", "--max-stages", "4"]),
    ("continual", ["--budget", "1"]),
    ("sro", ["--max-epochs", "2"]),
])
def test_logged_epochs_are_the_examples_trained(tmp_path, odd, method, flags):
    sizes = {t: len(data.load_mixture(odd)[t]["train"]) for t in data.load_mixture(odd)}
    args = train.parse_args(["--method", method, "--out", str(tmp_path), *ODD, *flags])
    train.train(args, odd / "model", odd)
    evals = path_epochs(read_log(tmp_path), sizes)
    assert len(evals) > 4
    for logged, trained, size in evals:  # within one step's worth (a batch of 5 over the mixture trained)
        assert abs(logged - trained) <= 5 / size + 1e-9, (logged, trained)
        if float(logged).is_integer() and method == "sft":
            assert abs(logged - trained) < 1e-9  # an epoch's last step takes what is left: whole epochs are exact


def test_ten_epochs_of_sft_train_every_example_ten_times(tmp_path, odd, monkeypatch):
    seen = Counter()
    spy(monkeypatch, data.MixtureSampler, "next_batch", lambda s, a, out: seen.update(out))
    args = train.parse_args(["--method", "sft", "--out", str(tmp_path), *ODD, "--interval", "1", "--eval-limit", "2"])
    final = train.train(args, odd / "model", odd)
    sizes = {t: len(rows["train"]) for t, rows in data.load_mixture(odd).items()}
    assert set(seen) == {(t, i) for t, n in sizes.items() for i in range(n)}
    assert set(seen.values()) == {10}
    steps = [e for e in read_log(tmp_path) if e["event"] == "train"]
    assert len(steps) == 10 * math.ceil(134 / 5) and sum(e["examples"] for e in steps) == 1340
    assert final["best_epoch"] in [float(k) for k in range(11)]


def hand_weights(n_answer, group):
    """The release's loss, written out: the step's batch in groups of `group` examples (a micro-batch of 4 on one
    of its GPUs), each group's mean over its answer tokens, and the mean of those; group 0 the step's token mean.
    An example's weight per answer token is then 1 / (groups x its group's tokens), or 1 / (the step's tokens)."""
    if group == 0:
        return [1 / sum(n_answer)] * len(n_answer)
    out = []
    n_groups = math.ceil(len(n_answer) / group)
    for g in range(n_groups):
        members = n_answer[g * group:(g + 1) * group]
        out += [1 / (n_groups * sum(members))] * len(members)
    return out


def test_loss_groups_give_each_example_its_hand_computed_share():
    # sampling order: short multiple-choice targets (" #### B" + EOS: 4 tokens) beside long gsm8k-like ones
    n = [4, 120, 4, 4, 200, 4, 4, 4, 160, 4]
    share = lambda w: [wi * ni for wi, ni in zip(w, n)]  # each example's share of the step's gradient
    # G = 4: groups [4,120,4,4] [200,4,4,4] [160,4]; each group's tokens share 1/3 of the step
    assert share(train.loss_weights(n, 4)) == pytest.approx(
        [4 / 396, 120 / 396, 4 / 396, 4 / 396, 200 / 636, 4 / 636, 4 / 636, 4 / 636, 160 / 492, 4 / 492])
    assert share(train.loss_weights(n, 0)) == pytest.approx([k / sum(n) for k in n])  # token sum: 508 tokens
    assert sum(share(train.loss_weights(n, 4))) == pytest.approx(1.0)
    for g in (0, 1, 3, 4, 7, 64):
        assert train.loss_weights(n, g) == pytest.approx(hand_weights(n, g))


@pytest.mark.parametrize("group", [0, 4])
def test_a_step_with_loss_groups_has_the_release_loss_and_gradient(tmp_path, odd, group):
    args = train.parse_args(["--method", "sft", "--out", str(tmp_path), *ODD, "--batch-size", "10",
                             "--micro-batch", "3", "--loss-group", str(group)])
    run = train.Run(args, odd / "model", odd)
    runfolder.open_log(run)
    saved = run.sampler.state_dict()
    batch = run.sampler.next_batch()
    run.sampler.load_state_dict(saved)
    grads = {}
    step = run.opt.step
    run.opt.step = lambda: (grads.update({k: p.grad.clone() for k, p in run.model.named_parameters()}), step())
    run.train_step()
    # by hand, one example at a time, through the base model: each group's token mean, then the mean of groups
    model = train.Transformer.from_pretrained(odd / "model")
    ce, n = [], []
    for t, i in batch:
        ids, labels = run.train_enc[t][i]
        target = torch.tensor(labels[1:])
        logits = model(torch.tensor([ids[:-1]]))[0]
        ce.append(torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100], reduction="sum"))
        n.append(int((target != -100).sum()))
    if group:
        groups = [range(s, min(s + group, len(batch))) for s in range(0, len(batch), group)]
        loss = sum(sum(ce[j] for j in g) / sum(n[j] for j in g) for g in groups) / len(groups)
    else:
        loss = sum(ce) / sum(n)
    loss.backward()
    (event,) = read_log(tmp_path)
    assert event["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-7)


def test_pure_bf16_keeps_weights_and_adam_states_in_bf16(tmp_path, odd):
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        (tmp_path / precision).mkdir()
        args = train.parse_args(["--method", "sft", "--out", str(tmp_path / precision), *ODD,
                                 "--precision", precision])
        run = train.Run(args, odd / "model", odd)
        runfolder.open_log(run)
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        run.train_step()
        assert {p.dtype for p in run.model.parameters()} == {dtype}
        states = [v for s in run.opt.state.values() for k, v in s.items() if k != "step"]
        assert states and {v.dtype for v in states} == {dtype}  # no fp32 master copy, no fp32 moments
        assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())


@pytest.mark.slow
def test_one_and_two_ranks_and_any_micro_batch_give_the_same_steps(tmp_path, odd):
    """The step's loss and gradients do not depend on how the batch is cut: 1 rank with micro-batches of 8 and
    2 gloo ranks with micro-batches of 2 log the same losses and save the same model."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    flags = ["--method", "sft", "--model", str(odd / "model"), "--data", str(odd), *ODD, "--max-epochs", "1",
             "--batch-size", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(base + [f"--nproc_per_node={n}", "--", str(REPO / "train.py"), *flags,
                                      "--micro-batch", str(m), "--out", str(tmp_path / f"w{n}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, m in ((1, 8), (2, 2))]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    one, two = ([e for e in read_log(tmp_path / f"w{n}") if e["event"] == "train"] for n in (1, 2))
    assert len(one) == len(two) == math.ceil(134 / 10)
    for a, b in zip(one, two):
        assert a["examples"] == b["examples"] and a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["task_loss"] == pytest.approx(a["task_loss"], rel=1e-5)
    from safetensors.torch import load_file
    m1, m2 = (load_file(tmp_path / f"w{n}" / "model" / "model.safetensors") for n in (1, 2))
    assert_trained_alike(m1, m2, lr=3e-3)  # ODD's lr


def test_the_final_model_is_reported_beside_the_global_best(tmp_path, odd):
    args = train.parse_args(["--method", "msft", "--out", str(tmp_path), *ODD, "--budget", "1", "--max-stages", "3",
                             "--save-final"])
    final = train.train(args, odd / "model", odd)
    log = read_log(tmp_path)
    decisions = [e for e in log if e["event"] == "decision"]
    assert len(decisions) == 3  # --max-stages
    last = decisions[-1]
    end = last["rollback_epoch"] if last["kind"] == "drop" else [e for e in log if e["event"] == "eval"][-1]["epoch"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert final["final_epoch"] == summary["final_epoch"] == end
    assert summary["final_test_scores"] == final["final_scores"] and set(final["final_scores"]) == set(final["scores"])
    # the two saved models score what the summary says on the test split
    for folder, scores in (("model", summary["test_scores"]), ("final-model", summary["final_test_scores"])):
        run = train.Run(train.parse_args(["--out", str(tmp_path / "x"), *ODD]), tmp_path / folder, odd)
        assert run.evaluate(run.tasks, split="test") == pytest.approx(scores, abs=1e-5)


def test_eval_limit_limits_the_selection_not_the_test_report(tmp_path, odd):
    """--eval-limit N scores checkpoints on the first N selection rows; the report on the test split takes every row,
    and says how many."""
    args = train.parse_args(["--method", "sft", "--out", str(tmp_path), *ODD, "--max-epochs", "0.5",
                             "--eval-limit", "2"])
    final = train.train(args, odd / "model", odd)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_rows"] == final["test_rows"] == {t: 8 for t in final["scores"]}
    run = train.Run(train.parse_args(["--out", str(tmp_path / "x"), *ODD]), tmp_path / "model", odd)
    assert run.evaluate(run.tasks, split="test", final=True) == pytest.approx(final["scores"], abs=1e-6)
    first_two = train.Run(train.parse_args(["--out", str(tmp_path / "y"), *ODD, "--eval-limit", "2"]),
                          tmp_path / "model", odd)
    assert first_two.evaluate(first_two.tasks, split="test") != pytest.approx(final["scores"], abs=1e-6)


def test_demos_file_replaces_the_drawn_shots_at_every_evaluation(tmp_path, odd):
    """--demos FILE (the release's hand-picked demonstrations, SPEC 9 exception 3) reaches the run's evaluator: its
    scores are evaluate.evaluate's with those demonstrations, and differ from the drawn shots'. A file missing a task
    is refused at start-up, naming the file and the task."""
    import evaluate
    tasks = sorted(json.loads((odd / "manifest.json").read_text())["tasks"])
    demos = {t: [{"question": f"{t}: which symbol comes first?", "answer": "#### a."},
                 {"question": "and after that one?", "answer": "#### b."}] for t in tasks}
    path = tmp_path / "demos.json"
    path.write_text(json.dumps(demos))
    with_demos = train.Run(train.parse_args(["--out", str(tmp_path / "a"), *ODD, "--demos", str(path)]),
                           odd / "model", odd)
    scores = with_demos.evaluate(with_demos.tasks)
    direct = evaluate.evaluate(with_demos.model, with_demos.tok, with_demos.eos, with_demos.mixture, tasks, "selection",
                               shots=0, seed=20, demos=evaluate.load_demos(path, tasks), limit=8, signal="loss")
    assert scores == {t: -r["loss"] for t, r in direct.items()}
    drawn = train.Run(train.parse_args(["--out", str(tmp_path / "b"), *ODD]), odd / "model", odd)
    assert drawn.evaluate(drawn.tasks) != scores
    path.write_text(json.dumps({t: demos[t] for t in tasks[1:]}))
    with pytest.raises(ValueError, match=f"{path}: no list of demonstrations for task '{tasks[0]}'"):
        train.Run(train.parse_args(["--out", str(tmp_path / "c"), *ODD, "--demos", str(path)]), odd / "model", odd)


# -----------------------------------------------------------------------------
# the newcomer's path: a run folder knows how it was started; console lines say what happened

class Killed(BaseException):
    pass


@pytest.mark.slow
def test_resume_needs_only_the_run_folder(tmp_path, odd, monkeypatch, capsys):
    """`train.py --resume --out RUN` continues RUN from its own args.json, to the uninterrupted run's log; a flag
    given again that would change the run is refused; a finished folder is refused without a file written."""
    flags = ["--method", "msft", "--model", str(odd / "model"), "--data", str(odd), *ODD, "--budget", "1",
             "--max-stages", "2", "--progress", "0"]
    train.main([*flags, "--out", str(tmp_path / "ref")])
    real, calls = train.Run.checkpoint, []

    def kill(self, state):
        calls.append(1)
        if len(calls) == 6:
            raise Killed
        return real(self, state)
    monkeypatch.setattr(train.Run, "checkpoint", kill)
    with pytest.raises(Killed):
        train.main([*flags, "--out", str(tmp_path / "run")])
    monkeypatch.setattr(train.Run, "checkpoint", real)
    with pytest.raises(SystemExit, match=r"other arguments than the run .*'batch_size': \(5, 6\)"):
        train.main(["--resume", "--out", str(tmp_path / "run"), "--batch-size", "6"])
    capsys.readouterr()
    train.main(["--resume", "--out", str(tmp_path / "run")])
    assert "resumed " + str(tmp_path / "run") + " from its last checkpoint: epoch " in capsys.readouterr().out
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("tok_per_s", "time")} for e in log]
    assert strip(read_log(tmp_path / "run")) == strip(read_log(tmp_path / "ref"))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(SystemExit, match="holds a finished run"):
        train.main(["--resume", "--out", str(tmp_path / "run")])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # no demo written into it
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds neither a run .* nor the demo: nothing to resume"):
        train.main(["--resume", "--out", str(tmp_path / "empty")])
    assert not [*(tmp_path / "empty").iterdir()]


def test_console_lines_say_what_happened(tmp_path, odd, capsys):
    train.main(["--method", "sft", "--model", str(odd / "model"), "--data", str(odd), *ODD, "--max-epochs", "1",
                "--progress", "0", "--out", str(tmp_path / "sft")])
    out = capsys.readouterr().out
    assert "decision" not in out and "roll back" not in out  # SFT decides nothing
    assert re.search(r"end of sft at epoch 1.00; the chosen checkpoint \(best average over all tasks\): epoch", out)
    train.main(["--method", "msft", "--model", str(odd / "model"), "--data", str(odd), *ODD, "--budget", "1",
                "--max-stages", "3", "--progress", "0", "--out", str(tmp_path / "msft")])
    out = capsys.readouterr().out
    drops = [e for e in read_log(tmp_path / "msft") if e["event"] == "decision" and e["kind"] == "drop"]
    assert drops, "the run should exclude a task for this test to bite"
    for e in drops:
        assert f"stage {e['stage']} drop: {e['excluded'][0]} peaked first, at epoch {e['rollback_epoch']:.2f}: " \
               "excluded, and the model rolled back there" in out
    when = ", ".join(f"{e['excluded'][0]} (stage {e['stage']}, epoch {e['rollback_epoch']:.2f})" for e in drops)
    assert f"; excluded {when}; the chosen checkpoint" in out


def test_the_demo_table_stars_each_peak_where_it_falls():
    from demo import curve_table
    evals = [{"epoch": k / 4, "avg": 0.0, "scores": {"a": -abs(k / 4 - 1.75), "b": k / 4}} for k in range(13)]
    rows = {line.split()[0]: line for line in curve_table(evals).splitlines()[2:-1]}
    assert list(rows) == ["0.00", "1.00", "1.75", "2.00", "3.00"]  # a's peak at 1.75 gets its row
    assert rows["1.75"].split()[1] in ("0.000*", "-0.000*") and rows["3.00"].split()[2] == "3.000*"
    assert curve_table(evals).endswith("peak epoch per task: a 1.75, b 3.00")


# -----------------------------------------------------------------------------
# padding-free training: packed rows give the padded micro-batches' loss and gradient

def test_packed_and_padded_passes_give_the_same_losses_and_gradients(demo):
    """A step mixing long and short examples (5 to 120 tokens): packed into rows with each example's attention
    confined to itself and its positions restarting, or padded, each example's loss and the step's gradient agree to
    float rounding; packing runs far fewer padded positions."""
    model = Transformer.from_pretrained(demo / "model")
    g = torch.Generator().manual_seed(0)
    enc = []
    for n in (5, 120, 7, 33, 100, 12, 9, 80, 64, 6):
        ids = torch.randint(1, 300, (n,), generator=g).tolist()
        enc.append((ids, [-100] * (n // 2) + ids[n // 2:]))
    weight = torch.tensor(train.loss_weights([sum(x != -100 for x in labels[1:]) for _, labels in enc], 4))
    out = {}
    for packed in (True, False):
        model.zero_grad()
        per, shapes = torch.zeros(len(enc)), []
        for part, (idx, targets, pos, docs) in data.forward_passes(enc, 0, 1, 4, 0, packed):
            losses = model(idx, targets, pos=pos, docs=docs)
            at = part if docs is None else list(range(len(losses)))
            (losses * weight[at]).sum().backward()
            per[at] += losses.detach()
            shapes.append(idx.numel())
        out[packed] = per, {k: p.grad.clone() for k, p in model.named_parameters()}, sum(shapes)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for k, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], grad, rtol=1e-4, atol=1e-7)
    assert out[True][2] < 0.8 * out[False][2]  # rows of 119 tokens, nearly full, against 4 padded passes


@pytest.mark.slow
def test_a_short_run_takes_the_same_decisions_packed_or_padded(tmp_path, odd):
    logs = {}
    for name, flag in (("packed", []), ("padded", ["--padded"])):
        args = train.parse_args(["--method", "msft", "--out", str(tmp_path / name), *ODD, "--budget", "1",
                                 "--max-stages", "3", *flag])
        train.train(args, odd / "model", odd)
        logs[name] = read_log(tmp_path / name)
    pick = lambda log, kind: [e for e in log if e["event"] == kind]
    assert [(e["kind"], e["excluded"], e["rollback_epoch"]) for e in pick(logs["packed"], "decision")] == \
           [(e["kind"], e["excluded"], e["rollback_epoch"]) for e in pick(logs["padded"], "decision")]
    for a, b in zip(pick(logs["packed"], "eval"), pick(logs["padded"], "eval")):  # sums in another order round otherwise, and
        # ODD's lr 3e-3 grows that over the steps (2.4e-4 seen by epoch 1.25): the decisions are what must agree
        assert a["epoch"] == b["epoch"] and a["scores"] == pytest.approx(b["scores"], abs=2e-3)
    real = lambda log: [(e["tokens"], e["real_frac"]) for e in pick(log, "train")]
    assert [t for t, _ in real(logs["packed"])] == [t for t, _ in real(logs["padded"])]  # the same real tokens
    assert all(p >= q for (_, p), (_, q) in zip(real(logs["packed"]), real(logs["padded"])))  # packed where it pays
