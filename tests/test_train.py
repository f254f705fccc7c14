"""train.py end to end on the CPU: mSFT's logged decisions are exactly msft.decide's on the logged scores, snapshots
held stay within active tasks + 1, two gloo processes give what one process gives, a run killed at a random
evaluation and resumed ends as an uninterrupted one, bad flags fail at start-up, a NaN loss stops the run, and the
real SmolLM2 checkpoint fine-tunes on real rows and saves a model that transformers loads."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import msft
import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# small: 2 epochs at most, roll-outs of half an epoch, the cheap loss signal, few evaluation examples
SMALL = ["--max-epochs", "2", "--budget", "0.5", "--interval", "0.25", "--signal", "loss", "--eval-limit", "16",
         "--batch-size", "16", "--micro-batch", "8", "--shots", "0", "--max-new-tokens", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = data.make_demo(tmp_path_factory.mktemp("demo") / "data")
    train.demo_checkpoint(folder)
    return folder


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
        elif e["event"] == "decision" and e["kind"] != "done":
            excluded, i = msft.decide(stage_hist)
            out.append((excluded, i))
            start = stage_hist[i] if i is not None else stage_hist[-1]
            active = [t for t in active if t not in excluded]
            stage_hist = [{t: start[t] for t in active}]
    return out


def test_msft_decisions_are_msft_decide_on_logged_scores(tmp_path, demo):
    final = run_train(tmp_path / "run", demo, "msft")
    log = read_log(tmp_path / "run")
    decisions = [e for e in log if e["event"] == "decision" and e["kind"] != "done"]
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
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("tok_per_s",)} for e in log]
    assert strip(a) == strip(b), f"killed after eval {k}: the resumed log differs from the uninterrupted one"
    assert json.loads((tmp_path / "ref" / "summary.json").read_text())["test_scores"] == \
           json.loads((tmp_path / "run" / "summary.json").read_text())["test_scores"]


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "--budget must be > 0"),
    (["--interval", "2", "--budget", "1"], "--interval must be > 0 and no larger than --budget"),
])
def test_bad_flags_fail_at_start(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_bad_setup_fails_at_start(tmp_path, demo):
    with pytest.raises(SystemExit, match="--batch-size 16 must be divisible by world size 1 x --micro-batch 5"):
        run_train(tmp_path / "a", demo, "sft", "--micro-batch", "5")
    (tmp_path / "empty").mkdir()
    with pytest.raises((SystemExit, ValueError), match="empty"):
        args = train.parse_args(["--out", str(tmp_path / "b"), *SMALL])
        train.train(args, demo / "model", tmp_path / "empty")
    small = tmp_path / "small-vocab"
    train.Transformer(train.ModelConfig(**{**data.DEMO_MODEL, "vocab_size": 100})).save_pretrained(small)
    for f in (demo / "tokenizer").glob("tokenizer*"):
        (small / f.name).write_bytes(f.read_bytes())
    with pytest.raises(SystemExit, match="the tokenizer has .* tokens but the model's vocabulary is 100"):
        args = train.parse_args(["--out", str(tmp_path / "c"), *SMALL])
        train.train(args, small, demo)


def test_nan_loss_stops_naming_the_step(tmp_path, demo):
    args = train.parse_args(["--method", "sft", "--out", str(tmp_path), *SMALL])
    run = train.Run(args, demo / "model", demo)
    run.open_log()
    run.train_step()
    with torch.no_grad():
        run.model.norm.weight.fill_(float("nan"))
    with pytest.raises(SystemExit, match="the loss is nan at step 2"):
        run.train_step()
    assert [e["event"] for e in read_log(tmp_path)] == ["train", "error"]


def test_smollm2_finetunes_with_msft_on_real_rows(tmp_path, smollm2, shared_data):
    transformers = pytest.importorskip("transformers")
    data.prepare(str(shared_data), tmp_path / "mix", tasks=["arc_easy", "openbookqa"], n_train=16, n_selection=4,
                 n_test=4, seed=20)
    args = train.parse_args(["--method", "msft", "--model", str(smollm2), "--data", str(tmp_path / "mix"),
                             "--out", str(tmp_path / "run"), "--max-epochs", "0.5", "--budget", "0.25",
                             "--interval", "0.25", "--batch-size", "8", "--micro-batch", "4", "--signal", "loss",
                             "--shots", "1", "--max-new-tokens", "8"])
    final = train.train(args, smollm2, tmp_path / "mix")
    assert set(final["scores"]) == {"arc_easy", "openbookqa"}
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert m.config.num_hidden_layers == 30
