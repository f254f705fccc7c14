"""Pins what a run trusts, and what it leaves (runfolder.py, common.py's files, msft.SnapshotStore): the saved model
is the scored one; every file a run reads back (snapshots, manifest, resume state, args) is refused in one line
naming it when it is damaged, cut short, swapped or missing; the resume fingerprint sees any changed byte; SFT and
every baseline resume exactly from a kill after their last checkpoint; a kill during the export or the cleanup
leaves nothing a later command trips on; no command writes into a folder a live run holds; a full disk, a bad
--device, an FSDP resume without torchrun and a lone surrogate in a row end in one line."""
import errno
import fcntl
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import common
import hub
import msft
import runfolder
import train
from conftest import cut_mixture, write_jsonl
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ["--interval", "0.5", "--signal", "loss", "--eval-limit", "8", "--batch-size", "8", "--micro-batch", "8",
         "--shots", "0", "--lr", "3e-3", "--max-epochs", "1", "--budget", "0.5", "--max-stages", "2", "--progress", "0"]


@pytest.fixture(scope="module")
def mix(demo_data, tmp_path_factory):
    """The demo's tasks cut to 24 training, 8 selection and 8 test rows each, with the demo's model."""
    return cut_mixture(demo_data, tmp_path_factory.mktemp("mix") / "mix", 24, 8, 8)


def run(out, mix, method="msft", *extra, model=None):
    return train.train(train.parse_args(["--method", method, "--out", str(out), *FLAGS, *extra]),
                       model or mix / "model", mix)


def events(out):
    strip = lambda e: {k: v for k, v in e.items() if k not in ("time", "tok_per_s")}
    return [strip(json.loads(line)) for line in (out / "log.jsonl").read_text().splitlines()]


class Killed(BaseException):  # not an Exception: nothing on the way catches it, as nothing catches a SIGKILL
    pass


def kill_at(monkeypatch, obj, name, n=1):
    """obj.name raises Killed on its n-th call (before it acts)."""
    real, calls = getattr(obj, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return real(*a, **kw)
    monkeypatch.setattr(obj, name, wrapper)


# -----------------------------------------------------------------------------
# the saved model is the scored one

def test_a_bf16_checkpoint_fine_tuned_saves_the_weights_it_scored(tmp_path, mix):
    """The source checkpoint is bf16; training keeps fp32 weights; model/ must hold those (an update smaller than
    half a bf16 step would vanish in a bf16 copy) and score, reloaded, what summary.json reports."""
    src = tmp_path / "bf16"
    m = Transformer.from_pretrained(mix / "model")
    hub.save_pretrained(m, src, dtype=torch.bfloat16, copy=sorted((mix / "model").glob("tokenizer*")))
    final = run(tmp_path / "run", mix, "sft", "--lr", "1e-4", model=src)
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    base = load_file(src / "model.safetensors")
    moved = [(saved[k] - base[k].float()).abs() for k in saved]
    assert any((d > 0).any() for d in moved)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reload = train.Run(train.parse_args(["--out", str(tmp_path / "x"), *FLAGS]), tmp_path / "run" / "model", mix)
    assert reload.evaluate(reload.tasks, split="test") == pytest.approx(summary["test_scores"], abs=1e-6)
    assert summary["test_scores"] == final["scores"]
    # a bf16 copy of the same weights would not score it: the updates are below half a bf16 step
    rounded = {k: v.to(torch.bfloat16).float() for k, v in saved.items()}
    assert any(not torch.equal(rounded[k], saved[k]) for k in saved)


# -----------------------------------------------------------------------------
# every file read back is verified

def test_snapshots_damaged_cut_swapped_or_missing_are_refused_naming_the_file(tmp_path):
    store = msft.SnapshotStore(tmp_path)
    for i in (3, 7):
        store.save(i, {"w": torch.arange(4096, dtype=torch.float32) * i}, {"epoch": i / 4, "stage": 1, "scores": {}})
    path = store.path(3)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2:len(good) // 2 + 64] = b"\xff" * 64  # bytes in the middle of the tensor data
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=f"{path}: damaged .*put the file back, or start the run again"):
        store.load(3)
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=f"{path}: missing or not a whole safetensors file"):
        store.load(3)
    path.write_bytes(good)
    shutil.copy(store.path(7), path)  # swapped: snapshot 7's file under 3's name
    with pytest.raises(ValueError, match=f"{path}: holds 'snapshot 7', not 'snapshot 3'"):
        store.load(3)
    path.write_bytes(good)
    assert torch.equal(store.load(3)["w"], torch.arange(4096, dtype=torch.float32) * 3)
    manifest = tmp_path / "manifest.json"
    m = json.loads(manifest.read_text())
    m["snapshots"]["3"]["epoch"] = 1.75  # edited by hand, or a stale copy: the checksum no longer matches
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{manifest}: damaged"):
        msft.SnapshotStore(tmp_path)


@pytest.fixture
def killed(tmp_path, mix, monkeypatch):
    """An mSFT run killed after its third checkpoint (its state, snapshots and args are on disk)."""
    with monkeypatch.context() as m:
        kill_at(m, train.Run, "checkpoint", 4)
        with pytest.raises(Killed):
            run(tmp_path / "run", mix)
    return tmp_path / "run"


@pytest.mark.parametrize("damage, message", [
    (lambda out: next((out / "state").glob("model-*")).write_bytes(b"\0" * 64), "model-.*: missing or not a whole"),
    (lambda out: (out / "state" / "state.json").write_text('{"tag": '), "state.json: not valid JSON"),
    (lambda out: common.write_json(out / "state" / "state.json", {k: v for k, v in common.read_json(
        out / "state" / "state.json", checked=True).items() if k != "run"}), "state.json: damaged"),
    (lambda out: common.write_json(out / "state" / "state.json", {k: v for k, v in common.read_json(
        out / "state" / "state.json", checked=True).items() if k != "run"}, checked=True), r"state.json: no \['run'\]"),
    (lambda out: next((out / "state").glob("optimizer-*")).unlink(), "optimizer-.*: missing"),
    (lambda out: (out / "args.json").write_text((out / "args.json").read_text().replace('"lr": 0.003', '"lr": 1')),
     "args.json: damaged"),
])
@pytest.mark.slow
def test_damaged_resume_state_is_refused_naming_the_file(killed, mix, damage, message):
    damage(killed)
    with pytest.raises((ValueError, SystemExit), match=message):
        run(killed, mix, "msft", "--resume")


@pytest.mark.slow
def test_the_fingerprint_sees_one_changed_byte_in_the_middle_of_the_checkpoint(killed, mix, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(mix / "model", model)
    weights = bytearray((model / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(weights[:8], "little")  # the tensors' bytes, after the header
    middle = start + (len(weights) - start) // 2 // 4 * 4
    weights[middle] ^= 1  # the lowest bit of one fp32 weight, far from the header and both ends
    (model / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(SystemExit, match="the checkpoint .* changed since the run .* began"):
        args = train.parse_args(["--method", "msft", "--out", str(killed), *FLAGS, "--resume"])
        train.train(args, model, mix)


@pytest.mark.slow
def test_an_fsdp_state_resumed_without_torchrun_says_how(killed, mix):
    s = common.read_json(killed / "state" / "state.json", checked=True)
    common.write_json(killed / "state" / "state.json", {**s, "fsdp": True, "world": 2}, checked=True)
    with pytest.raises(SystemExit, match=f"{killed} holds FSDP shards of 2 ranks, and this is 1: resume it as it ran, "
                                         f"torchrun --nproc_per_node=2 .* train.py --resume --out {killed}"):
        run(killed, mix, "msft", "--resume")


# -----------------------------------------------------------------------------
# resume after the last checkpoint, and kills during the export and the cleanup

@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "msft", "continual", "sro", "soft-sro", "ies", "dynamix"])
def test_a_kill_in_the_report_resumes_to_the_uninterrupted_run(tmp_path, mix, monkeypatch, method):
    extra = {"dynamix": ["--dynamix-every", "2"], "ies": ["--ies-window", "1"]}.get(method, [])
    final = run(tmp_path / "ref", mix, method, *extra)
    for where in ("evaluate", "export"):  # the test split's evaluation, then the model's export
        out = tmp_path / where
        with monkeypatch.context() as m:
            if where == "evaluate":
                kill_at(m, train.Run, "evaluate", n=sum(e["event"] == "eval" for e in events(tmp_path / "ref")) + 1)
            else:
                kill_at(m, runfolder, "export")
            with pytest.raises(Killed):
                run(out, mix, method, *extra)
        again = run(out, mix, method, *extra, "--resume")
        assert events(out) == events(tmp_path / "ref"), f"{method}: killed in the report's {where}"
        assert again["flops"] == final["flops"] and again["scores"] == final["scores"]


@pytest.mark.slow
def test_a_kill_in_the_export_or_the_cleanup_leaves_nothing_to_trip_on(tmp_path, mix, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # killed while copying the tokenizer into the new model/
        kill_at(m, shutil, "copy", n=2)
        with pytest.raises(Killed):
            run(out, mix, "sft")
    assert not (out / "model").exists()  # no model/ with half its files under the name
    (out / ".model.tmp").mkdir()  # what a SIGKILL there leaves: the folder being written, a file cut short
    (out / ".model.tmp" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with monkeypatch.context() as m:  # the resume exports afresh, then is killed removing the resume state
        real = common.remove
        m.setattr(common, "remove", lambda p: (_ for _ in ()).throw(Killed()) if p.name == "snapshots" else real(p))
        with pytest.raises(Killed):
            run(out, mix, "sft", "--resume")
    assert (out / "summary.json").is_file() and (out / "snapshots").exists()
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(
        ["config.json", "model.safetensors"] + [p.name for p in (mix / "model").glob("tokenizer*")])
    # the next command on the folder finishes the cleanup and says the run is finished
    with pytest.raises(SystemExit, match="holds a finished run"):
        run(out, mix, "sft", "--resume")
    assert not (out / "snapshots").exists() and not (out / "state").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file or folder left


def test_no_command_writes_into_a_folder_a_live_run_holds(tmp_path, mix, refused):
    out = tmp_path / "run"
    run(out, mix, "sft")
    runfolder._LOCKS.pop(out.resolve()).close()  # this process's own lock on it ends, as the run's process would
    with open(out / "lock", "a+") as held:  # another process's run on the folder: a lock of another open file
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("4242\n")
        held.flush()
        line = refused("evaluate.py", "--model", out / "model", "--data", mix, "--signal", "loss", "--limit", 2,
                       "--out", out / "model" / "eval")
        assert f"{out / 'model' / 'eval'} is inside {out}, the folder of a live run (pid 4242)" in line
        with pytest.raises(SystemExit, match="in use by another run"):
            run(out, mix, "sft")
    assert not (out / "model" / "eval").exists()


# -----------------------------------------------------------------------------
# one line, not a traceback

def test_a_full_disk_names_the_folder_and_its_free_space(tmp_path, monkeypatch):
    import safetensors
    def full(*a, **kw):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(common, "save_file", full)
    with pytest.raises(OSError) as e:
        common.save_tensors(tmp_path / "snapshot-000001.safetensors", {"w": torch.zeros(2)}, "snapshot 1")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "snapshot-000001.safetensors")
    assert "no space left on the device (" in e.value.strerror and "MiB free there)" in e.value.strerror
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert "argument --device: 'cuda': this torch sees no CUDA device" in capsys.readouterr().err


def test_a_lone_surrogate_in_a_row_is_named_by_file_and_line(tmp_path, refused):
    write_jsonl(tmp_path / "src" / "t" / "train.jsonl", [{"question": f"q{n}?", "answer": "a"} for n in range(8)])
    path = tmp_path / "src" / "t" / "train.jsonl"
    path.write_text(path.read_text().replace('"q3?"', '"q\\udc80?"'))  # JSON can spell one; UTF-8 cannot hold it
    line = refused("data.py", "prepare", "--source", tmp_path / "src", "--out", tmp_path / "mix", "--train", 4,
                   "--selection", 2, "--test", 2)
    assert f"{path}:4: " in line and "surrogates not allowed" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no hidden temporary folder left


def test_another_models_tokenizer_is_refused_by_train_py(tmp_path, mix, refused):
    m = tmp_path / "m"
    model = Transformer(ModelConfig(vocab_size=1000, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                                    hidden_dim=64, tie_embeddings=True))
    hub.save_pretrained(model, m, copy=sorted((mix / "model").glob("tokenizer*")))
    line = refused("train.py", "--model", m, "--data", mix, "--out", tmp_path / "o", *FLAGS)
    assert line == f"error: {m}: the tokenizer has 320 tokens, the model's vocabulary 1000: not this model's tokenizer"
