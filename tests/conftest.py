"""Shared test fixtures: where the real data and the real checkpoint live, and skips when absent; a command run as a
user runs it, refused at the door."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SMOLLM2_TOOL = SHARED / "tools" / "get-smollm2.sh"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or MSFT_SHARED_DATA (a machine without ../shared): real benchmark rows in the hub's schema
    (never copied into the repo)."""
    folder = Path(os.environ.get("MSFT_SHARED_DATA") or SHARED_DATA)
    if not folder.is_dir():
        pytest.skip(f"real benchmark rows not found at {folder} (a checkout without ../shared; set MSFT_SHARED_DATA)")
    return folder


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint in hub layout, built offline by ../shared/tools."""
    if os.environ.get("MSFT_SMOLLM2"):
        return Path(os.environ["MSFT_SMOLLM2"])
    if not SMOLLM2_TOOL.is_file():
        pytest.skip(f"{SMOLLM2_TOOL} not found: cannot build the real checkpoint here")
    run = subprocess.run(["bash", str(SMOLLM2_TOOL)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"{SMOLLM2_TOOL} failed (exit {run.returncode}): {run.stderr[-500:]}")
    return Path(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): such models run many
    times faster on one thread; on a busy 2-core machine a second torch thread spins against the first."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def refused():
    """refused("data.py", *args) runs the command as a user does, checks that it was refused at the door (exit status
    2, no traceback, one line on stderr: after argparse's usage, for a flag) and returns that line."""
    def run(script, *args):
        r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        if lines[0].startswith("usage:"):  # argparse's usage, its continuation lines indented, then the error
            assert all(line.startswith(" ") for line in lines[1:-1]), r.stderr
            lines = lines[-1:]
        assert len(lines) == 1 and "error: " in lines[0], r.stderr
        return lines[0]
    return run


def cut_mixture(src: Path, out: Path, train, selection: int, test: int) -> Path:
    """A mixture folder `out` holding the first rows of each task of `src` (e.g. the demo's) and a copy of its
    model: `train` rows a task (an int, or one count per task in sorted order), `selection` and `test` rows."""
    manifest = json.loads((src / "manifest.json").read_text())
    tasks = sorted(manifest["tasks"])
    trains = dict(zip(tasks, train if isinstance(train, (list, tuple)) else [train] * len(tasks)))
    for t in tasks:
        (out / t).mkdir(parents=True)
        for split, n in (("train", trains[t]), ("selection", selection), ("test", test)):
            rows = (src / t / f"{split}.jsonl").read_text().splitlines()[:n]
            (out / t / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows))
            manifest["tasks"][t]["sizes"][split] = n
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(src / "model", out / "model")
    return out
