"""Sharded training (fsdp.py, train.py --fsdp) on the CPU with gloo: 2 FSDP ranks make the same mSFT decisions,
scores and saved model as 1 plain rank (the saved model loads in transformers with the same logits); a run killed
with SIGKILL at a random evaluation resumes from its per-rank shards to the uninterrupted run's decisions and
scores; activation checkpointing changes no loss; the demo runs under torchrun on a fresh folder; each rank keeps
only its own shard of every roll-back snapshot."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_trained_alike


pytestmark = pytest.mark.slow  # several processes each

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--budget", "1", "--max-stages", "2", "--interval", "0.25", "--signal", "loss",
         "--batch-size", "16", "--micro-batch", "4", "--shots", "0", "--lr", "5e-4"]  # the demo's lr: stable, so
# float rounding that differs with the world size stays at rounding size (a fresh Adam at 3e-3 amplifies it)


@pytest.fixture(scope="module")
def demo(demo_data):
    return demo_data


def launch(out, demo, nproc, *extra, method="msft"):
    # "--" before the script: torchrun would read our --signal as an abbreviation of its --signals-to-handle
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--",
           str(REPO / "train.py"), "--method", method, "--model", str(demo / "model"), "--data", str(demo),
           "--out", str(out), "--keep-state", *SMALL, *extra]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(*procs):
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def decisions(log):
    return [(e["kind"], e["excluded"], e.get("rollback_epoch")) for e in log if e["event"] == "decision"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo):
    """The same mSFT run on 1 plain rank, on 2 FSDP ranks and on 4 DDP ranks."""
    tmp_path = tmp_path_factory.mktemp("runs")
    finish(launch(tmp_path / "one", demo, 1), launch(tmp_path / "fsdp", demo, 2, "--fsdp"),
           launch(tmp_path / "four", demo, 4))
    return tmp_path


def test_two_fsdp_ranks_match_one_plain_rank(runs):
    tmp_path = runs
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "fsdp")
    assert decisions(a) == decisions(b) and any(k == "drop" for k, _, _ in decisions(a))
    for x, y in zip([e for e in a if e["event"] == "eval"], [e for e in b if e["event"] == "eval"]):
        assert x["epoch"] == y["epoch"]
        assert y["scores"] == pytest.approx(x["scores"], abs=1e-4)
    assert b[-1]["scores"] == pytest.approx(a[-1]["scores"], abs=1e-4)
    m1, m2 = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("one", "fsdp"))
    assert m1.keys() == m2.keys()
    assert_trained_alike(m1, m2, lr=5e-4)  # SMALL's lr
    # the gathered model loads in transformers with the 1-rank model's logits
    transformers = pytest.importorskip("transformers")
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        l1, l2 = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d / "model")(idx).logits
                  for d in ("one", "fsdp"))
    torch.testing.assert_close(l2, l1, rtol=0, atol=1e-4)
    # each rank kept its own rows of every roll-back snapshot, which together are the 1-rank run's whole one
    one = json.loads((tmp_path / "one" / "snapshots" / "manifest.json").read_text())
    ranks = [tmp_path / "fsdp" / "snapshots" / f"rank{r:05d}-of-00002" for r in (0, 1)]
    assert sorted(p.name for p in (tmp_path / "fsdp" / "snapshots").iterdir()) == [p.name for p in ranks]
    for shards in (json.loads((folder / "manifest.json").read_text()) for folder in ranks):
        assert shards["snapshots"].keys() == one["snapshots"].keys() and shards["peak_held"] == one["peak_held"]
        assert [m["epoch"] for m in shards["snapshots"].values()] == [m["epoch"] for m in one["snapshots"].values()]
    for i in one["snapshots"]:
        whole = load_file(tmp_path / "one" / "snapshots" / f"snapshot-{int(i):06d}.safetensors")
        parts = [load_file(folder / f"snapshot-{int(i):06d}.safetensors") for folder in ranks]
        assert parts[0].keys() == whole.keys()
        for k in whole:
            assert parts[0][k].shape[0] < whole[k].shape[0] or whole[k].shape[0] == 1
        assert_trained_alike({k: torch.cat([p[k] for p in parts]) for k in whole}, whole, lr=5e-4)


def test_four_ddp_ranks_match_one_rank(runs):
    """World 4 trains the same examples in the same steps (each rank a quarter of every global batch) and takes the
    same decisions; the scores differ only by float rounding of the sums over ranks."""
    a, b = read_log(runs / "one"), read_log(runs / "four")
    assert decisions(a) == decisions(b) and any(k == "drop" for k, _, _ in decisions(a))
    steps = lambda log: [(e["epoch"], e["examples"], e["tokens"]) for e in log if e["event"] == "train"]
    assert steps(a) == steps(b)
    for x, y in zip([e for e in a if e["event"] == "eval"], [e for e in b if e["event"] == "eval"]):
        assert x["epoch"] == y["epoch"] and y["scores"] == pytest.approx(x["scores"], abs=1e-4)
    assert b[-1]["scores"] == pytest.approx(a[-1]["scores"], abs=1e-4)


def test_fsdp_kill_at_a_random_evaluation_then_resume(tmp_path, demo, runs):
    evals = sum(e["event"] == "eval" for e in read_log(runs / "fsdp"))
    k = random.Random(os.getpid()).randrange(2, evals - 1)
    p = launch(tmp_path / "run", demo, 2, "--fsdp")
    log = tmp_path / "run" / "log.jsonl"
    while p.poll() is None and (not log.exists() or log.read_text().count('"event": "eval"') < k):
        time.sleep(0.05)
    # torchrun and both ranks at once, as a machine that goes down (torchrun starts its workers in sessions of their
    # own: kill every process that writes this folder)
    subprocess.run(["pkill", "-9", "-f", str(tmp_path / "run")])
    p.communicate()
    finish(launch(tmp_path / "run", demo, 2, "--fsdp", "--resume"))
    a, b = read_log(runs / "fsdp"), read_log(tmp_path / "run")
    assert decisions(a) == decisions(b), f"killed after eval {k}"
    assert b[-1]["scores"] == pytest.approx(a[-1]["scores"], abs=1e-6)
    assert b[-1]["final_scores"] == pytest.approx(a[-1]["final_scores"], abs=1e-6)


def test_activation_checkpointing_changes_no_loss(tmp_path, demo):
    finish(launch(tmp_path / "plain", demo, 1, "--max-epochs", "0.5", method="sft"),
           launch(tmp_path / "ac", demo, 1, "--max-epochs", "0.5", "--activation-checkpointing", method="sft"))
    a, b = ([e["loss"] for e in read_log(tmp_path / d) if e["event"] == "train"] for d in ("plain", "ac"))
    assert len(a) == len(b) > 50  # half an epoch of the demo: 53 steps
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_the_demo_under_torchrun_on_a_fresh_folder(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
           str(REPO / "train.py"), "--method", "msft", "--out", str(tmp_path / "demo"), "--max-stages", "1",
           "--budget", "1"]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert (tmp_path / "demo" / "msft" / "summary.json").is_file()
    assert "| msft |" in p.stdout
