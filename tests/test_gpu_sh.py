"""bench/gpu.sh at toy sizes on the CPU (--tiny), end to end: every part runs (the GPU tests skip without CUDA, the
benchmarks at toy sizes), gpu.json records each part's status, the benchmark figures and the targets, and only
gpu.json, gpu.log and pytest.log are written. A part that fails is recorded and makes the exit status 1. About 35 s
on the 2-core development machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # several processes each

REPO = Path(__file__).resolve().parents[1]


def gpu_sh(out: Path, *args, **env) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    p = subprocess.run(["bash", "bench/gpu.sh", str(out), "--tiny", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    return p, json.loads((out / "gpu.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="--tiny is the CPU form; on a GPU run bench/gpu.sh itself")
def test_gpu_sh_tiny_writes_every_part(tmp_path):
    p, report = gpu_sh(tmp_path / "out")
    assert p.returncode == 0, p.stdout + p.stderr + (tmp_path / "out" / "gpu.log").read_text()[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu.json", "gpu.log", "pytest.log"]
    assert report["tiny"] and report["failed"] == [] and report["environment"]["torch"] == torch.__version__
    tests = report["parts"]["tests"]
    assert tests["status"] == "passed" and len(tests["tests"]) == 6
    assert all(c["outcome"] == "skipped" and "no CUDA" in c["message"] for c in tests["tests"].values())
    mfu = report["parts"]["train_mfu"]
    assert mfu["status"] == "passed" and mfu["result"]["batch_size"] == 2
    assert [(r["what"], r["compiled"]) for r in mfu["result"]["rows"]] == [("train step", False)]
    assert {"ours_mfu", "transformers_mfu", "transformers_over_ours"} <= set(mfu["result"]["rows"][0])
    assert "ours_at_least_transformers_eager_train_step" in report["targets"]
    ev = report["parts"]["eval_openbookqa"]
    if ev["status"] == "skipped":  # a checkout without ../shared or the SmolLM2 checkpoint
        assert "needs" in ev["reason"]
    else:
        assert ev["status"] == "passed" and ev["result"]["n"] == 2 and ev["result"]["same_output"] == 2
        assert "eval_openbookqa_speedup_at_least_3x" in report["targets"]


def test_gpu_sh_records_a_failed_part_and_exits_1(tmp_path):
    bad = tmp_path / "bad-checkpoint"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_text("not a checkpoint")
    data = Path(os.environ.get("MSFT_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (data / "openbookqa").is_dir():
        data = tmp_path / "data"  # the part only needs the files to exist to get as far as the checkpoint
        for task in ("openbookqa", "gsm8k"):
            (data / task).mkdir(parents=True)
            for split in ("train", "test"):
                (data / task / f"{split}.jsonl").write_text("")
    p, report = gpu_sh(tmp_path / "out", "--only", "eval", MSFT_SMOLLM2=str(bad), MSFT_SHARED_DATA=str(data))
    assert p.returncode == 1, p.stdout + p.stderr
    assert report["failed"] == ["eval_openbookqa"] and report["parts"]["eval_openbookqa"]["exit"] not in (0, 124)
    assert "failed: ['eval_openbookqa']" in p.stdout


def test_protocol_sh_tiny_runs_every_method_resumes_and_packs_the_results(tmp_path):
    """bench/protocol.sh --tiny: the demo's model and mixture, every method as its own train.py at once, SRO and Soft
    SRO on SFT's log, the two tables and the SFT peaks, one archive without weights; a second call finds every run
    finished and launches none."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MSFT_PROTOCOL_RUNS": str(tmp_path / "runs")}
    cmd = ["bash", "bench/protocol.sh", str(tmp_path / "out"), "--tiny", "--deadline", "400"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "protocol.log").read_text()
    assert p.returncode == 0, p.stdout + p.stderr
    methods = ["continual", "dynamix", "ies", "msft", "sft", "soft-sro", "sro"]
    for m in methods:
        summary = json.loads((tmp_path / "runs" / "main" / m / "summary.json").read_text())
        assert summary["method"] == m and f"main/{m}: chosen epoch" in log
    assert json.loads((tmp_path / "runs" / "c1" / "msft" / "summary.json").read_text())["args"]["budget"] == 0.1
    sro = json.loads((tmp_path / "runs" / "main" / "sro" / "args.json").read_text())
    assert sro["search_log"] == str(tmp_path / "runs" / "main" / "sft" / "log.jsonl")
    assert "SFT per-task peak epochs" in log
    table = json.loads((tmp_path / "runs" / "main" / "table.json").read_text())
    assert sorted(table["methods"]) == methods and table["unfinished"] == []
    listed = subprocess.run(["tar", "-tzf", str(tmp_path / "out" / "protocol.tar.gz")], capture_output=True,
                            text=True).stdout.split()
    assert "./main/msft/log.jsonl" in listed and "./main/table.md" in listed
    assert not any("/model/" in f or "/state/" in f or f.endswith(".safetensors") for f in listed)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "start" not in again.stdout.replace("protocol:", "")
