"""Shared test fixtures: where the real data and the real checkpoint live, and skips when absent; a command run as a
user runs it, refused at the door."""
import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SMOLLM2_TOOL = SHARED / "tools" / "get-smollm2.sh"


def pytest_collection_modifyitems(items):
    """A test of the real checkpoint is slow (it loads, and on a fresh machine first builds, SmolLM2): marked so by
    the fixture it asks for, so that `pytest -m "not slow"` leaves every one of them out."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def command(monkeypatch):
    """command("data.py", *args) -> (exit status, stdout, stderr): the command as a user runs it (its `__main__`, with
    these arguments), in this process, which skips a second interpreter's start and torch import."""
    def run(script, *args):
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")  # anything but SystemExit fails the test
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue(), err.getvalue()
    return run


@pytest.fixture
def refused(command):
    """refused("data.py", *args) runs the command as a user does (command), checks that it was refused at the door
    (exit status 2, no traceback, one line on stderr: after argparse's usage, for a flag) and returns that line."""
    def run(script, *args):
        code, _, err = command(script, *args)
        assert code == 2, err
        lines = err.strip().splitlines()
        if lines[0].startswith("usage:"):  # argparse's usage, its continuation lines indented, then the error
            assert all(line.startswith(" ") for line in lines[1:-1]), err
            lines = lines[-1:]
        assert len(lines) == 1 and "error: " in lines[0], err
        return lines[0]
    return run


def first_row(path, pred=lambda r: True):
    return next(r for r in map(json.loads, open(path, encoding="utf-8")) if pred(r))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def mixture(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture")
    with pytest.warns(UserWarning, match="sciq: asked for train 1800, only 800 rows"):
        prepare.prepare(str(shared_data), out)
    return out


@pytest.fixture
def src(tmp_path):
    """Three small tasks of plain rows, DIR/{a,b,c}/train.jsonl."""
    for task in "abc":
        write_jsonl(tmp_path / "src" / task / "train.jsonl", [
            {"question": f"Is {task}{n} odd?", "answer": "AB"[n % 2], "choices": ["no", "yes"]} for n in range(10)])
    return tmp_path / "src"


def small(src, out, **kw):
    return prepare.prepare(str(src), out, n_train=6, n_selection=2, n_test=2, **kw)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


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


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's mixture folder (demo.py) with its tiny model in model/, built once a session; tests only read it."""
    from demo import demo_checkpoint, make_demo
    folder = make_demo(tmp_path_factory.mktemp("demo") / "data")
    demo_checkpoint(folder)
    return folder


@torch.no_grad()
def generate(model, idx, max_new_tokens: int):
    """Plain greedy decoding of equal-length prompts with the KV cache: the reference evaluate.py's batched
    decoding is checked against."""
    from model import KVCache
    p = next(model.parameters())
    cache = KVCache(model.config, idx.size(0), idx.size(1) + max_new_tokens, p.device, p.dtype)
    logits = model(idx, cache=cache)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat((idx, nxt), dim=1)
        logits = model(nxt, cache=cache)
    return idx


def assert_trained_alike(a: dict, b: dict, lr: float):
    """Two runs' weights that differ only in how sums were cut (ranks, micro-batches): the sums round differently in
    the last bits of each gradient, and Adam divides each update by the gradient's own scale, so where a gradient is
    near zero that rounding can move its update by up to one step of lr. Hence almost every weight within 1e-5, and
    none further apart than lr. (A flat atol of 1e-5 once failed on a fresh clone: 1 of 9,216 weights, 1.94e-5.)"""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert diff.max() < lr and (diff > 1e-5).float().mean() < 1e-3, (k, diff.max().item())

