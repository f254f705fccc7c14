"""Pins prepare.py: the ten converters in the release's task formats (real rows from ../shared/data, hand-made hub
rows for aqua_rat, winogrande and medmcqa; prompts and targets written out by hand), every real row's trained target
read back by evaluate.py's answer rule as its gold, bad rows named by file and line, `prepare` (manifest, policy,
byte-for-byte determinism). At the door: `python data.py prepare` refuses bad flags with one line naming them, its
--help lists the tasks and defaults, and a mixture folder is replaced whole or not at all (a failure mid-way, a
killed run's leftovers, a full disk on a small tmpfs).

Run: python -m pytest -q tests/test_prepare.py
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import data
import evaluate as ev
import prepare
from conftest import first_row, small, snapshot, write_jsonl
from data import Example, LETTERS

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# converters

def test_converters_on_first_real_rows(shared_data):
    # expected values written by hand from the first row of each file
    row = first_row(shared_data / "commonsense_qa/train.jsonl")
    assert prepare.convert("commonsense_qa", row) == Example(
        "The sanctions against the school were a punishing blow, and they seemed to what the efforts the school "
        "had made to change?", "A", ("ignore", "enforce", "authoritarian", "yell at", "avoid"))
    row = first_row(shared_data / "openbookqa/train.jsonl")
    assert prepare.convert("openbookqa", row) == Example("The sun is responsible for", "D", (
        "puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
        "plants sprouting, blooming and wilting"))
    row = first_row(shared_data / "gsm8k/train.jsonl")
    assert prepare.convert("gsm8k", row) == Example(
        row["question"], "72", None, "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                                     "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    row = first_row(shared_data / "gsm8k/train.jsonl", lambda r: r["answer"].endswith("#### 1,080"))
    assert prepare.convert("gsm8k", row).answer == "1,080"  # as the trained text writes it
    row = first_row(shared_data / "hellaswag/validation.jsonl")
    assert prepare.convert("hellaswag", row) == Example('"A man is sitting on a roof. he"', "D", (
        '"is using wrap to wrap a pair of skis."', '"is ripping level tiles off."', '"is holding a rubik\'s cube."',
        '"starts pulling up roofing on a roof."'))
    row = first_row(shared_data / "boolq/train.jsonl")
    ex = prepare.convert("boolq", row)
    assert ex.answer == "True" and ex.choices is None
    assert ex.question == row["passage"] + "\nare bok choy and pak choi the same?"
    row = first_row(shared_data / "arc_easy/train.jsonl", lambda r: r["choices"]["label"][0] == "1")
    ex = prepare.convert("arc_easy", row)
    assert ex.answer == "ABCDE"[int(row["answerKey"]) - 1] and ex.choices == tuple(row["choices"]["text"])
    row = first_row(shared_data / "sciq/validation.jsonl")
    assert prepare.convert("sciq", row) == Example(row["question"], "darwin")


def test_release_formats_written_out(shared_data):
    # the whole training text of each task's first real row, written by hand from SPEC section 9's formats
    text = lambda task, path: (lambda ex: data.format_prompt(ex) + data.format_target(ex))(
        prepare.convert(task, first_row(shared_data / path)))
    assert text("commonsense_qa", "commonsense_qa/train.jsonl") == (
        "Q: The sanctions against the school were a punishing blow, and they seemed to what the efforts the school "
        "had made to change?\noptions: A. ignore, B. enforce, C. authoritarian, D. yell at, E. avoid\nA: #### A")
    assert text("hellaswag", "hellaswag/validation.jsonl") == (
        'Q: "A man is sitting on a roof. he"\noptions: A. "is using wrap to wrap a pair of skis.", B. "is ripping '
        'level tiles off.", C. "is holding a rubik\'s cube.", D. "starts pulling up roofing on a roof."\nA: #### D')
    row = first_row(shared_data / "sciq/validation.jsonl")
    assert text("sciq", "sciq/validation.jsonl") == f"Q: {row['question']}\nA: #### darwin"
    row = first_row(shared_data / "gsm8k/train.jsonl")
    assert text("gsm8k", "gsm8k/train.jsonl") == f"Q: {row['question']}\nA: {row['answer']}"
    row = first_row(shared_data / "boolq/train.jsonl")
    assert text("boolq", "boolq/train.jsonl") == (
        f"Q: {row['passage']}\nare bok choy and pak choi the same?\nA: #### True")


def test_every_real_row_converts_and_agrees_with_its_source(shared_data):
    # an independent reading of each row's answer, checked against the converter on all ~47k rows
    for path in sorted(shared_data.glob("*/*.jsonl")):
        task = path.parent.name
        for row in map(json.loads, open(path, encoding="utf-8")):
            ex = prepare.convert(task, row)
            picked = None if ex.choices is None else ex.choices[LETTERS.index(ex.answer)]
            if task in ("commonsense_qa", "openbookqa", "arc_easy"):
                assert picked == row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
            elif task == "hellaswag":
                assert picked == f'"{row["endings"][int(row["label"])]}"'
            elif task == "sciq":
                assert ex.answer == row["correct_answer"] and ex.choices is None
            elif task == "gsm8k":
                assert ex.rationale == row["answer"] and ex.answer == row["answer"].split("#### ")[1]
                float(ex.answer.replace(",", ""))  # a number, thousands commas and all
            elif task == "boolq":
                assert ex.answer == ("True" if row["answer"] else "False")
            # what training writes after "A:", read back by evaluation's rule, is the gold answer
            assert ev.is_correct(ev.extract_answer(data.format_target(ex)), ex.answer)


def test_converters_on_hand_made_rows():
    aqua = {"question": "Two trains travel 60 km at 30 km/h. How many hours?", "options": ["A)1", "B)2", "C)3"],
            "rationale": "60 / 30 = 2 hours.\nANSWER: B", "correct": "B"}
    ex = prepare.convert("aqua_rat", aqua)
    assert data.format_prompt(ex) + data.format_target(ex) == (
        "Q: Two trains travel 60 km at 30 km/h. How many hours?\noptions: A. 1, B. 2, C. 3\n"
        "A: 60 / 30 = 2 hours.\nANSWER: B #### B")
    wino = {"sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
            "option1": "trophy", "option2": "suitcase", "answer": "1"}
    ex = prepare.convert("winogrande", wino)
    assert data.format_prompt(ex) + data.format_target(ex) == (
        "Q: The trophy doesn't fit into the suitcase because the _ is too large.\n"
        "options: A. trophy , B. suitcase \nA: #### A")
    assert prepare.convert("winogrande", {**wino, "answer": "2"}).answer == "B"
    med = {"id": "x1", "question": "Which vitamin deficiency causes scurvy?", "opa": "A", "opb": "B12", "opc": "C",
           "opd": "D", "cop": 2, "choice_type": "single", "exp": "Vitamin C.", "subject_name": "Biochemistry"}
    ex = prepare.convert("medmcqa", med)
    assert data.format_prompt(ex) + data.format_target(ex) == (
        "Q: Which vitamin deficiency causes scurvy?\noptions: A. A, B. B12, C. C, D. D\nA: #### C")
    # the hub's unlabelled test rows fail loudly instead of training on a made-up label
    for task, row in (("winogrande", {**wino, "answer": ""}), ("medmcqa", {**med, "cop": -1}),
                      ("hellaswag", {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": ""}),
                      ("aqua_rat", {**aqua, "correct": "E"}), ("aqua_rat", {**aqua, "options": ["A)1", "C)2"]})):
        with pytest.raises(ValueError):
            prepare.convert(task, row)


def test_bad_rows_and_names_fail_before_training(shared_data, tmp_path):
    row = first_row(shared_data / "commonsense_qa/train.jsonl")
    src = tmp_path / "src"
    write_jsonl(src / "commonsense_qa/train.jsonl", [row, {k: v for k, v in row.items() if k != "answerKey"}])
    with pytest.raises(ValueError, match=r"commonsense_qa/train.jsonl:2: missing field 'answerKey'"):
        prepare.prepare(str(src), tmp_path / "out", n_train=1, n_selection=1, n_test=1)
    write_jsonl(src / "commonsense_qa/train.jsonl", [row, {**row, "answerKey": "F"}])
    with pytest.raises(ValueError, match=r"train.jsonl:2: answerKey 'F' is not one of the labels"):
        prepare.prepare(str(src), tmp_path / "out", n_train=1, n_selection=1, n_test=1)
    write_jsonl(src / "commonsense_qa/train.jsonl", [])
    with pytest.raises(ValueError, match="train.jsonl: empty split"):
        prepare.prepare(str(src), tmp_path / "out", n_train=1, n_selection=1, n_test=1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        prepare.prepare(str(src), tmp_path / "out", tasks=["nope"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        prepare.prepare("hub", tmp_path / "out", tasks=["nope"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        prepare.convert("nope", row)
    with pytest.raises(ValueError, match="answer 'E' is not one of the choice letters A-D"):
        data.from_plain({"question": "q", "answer": "E", "choices": ["1", "2", "3", "4"]})
    with pytest.raises(ValueError, match="--selection must be a positive integer"):
        prepare.prepare(str(src), tmp_path / "out", n_selection=0)


def test_hub_source_without_datasets_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails, installed or not
    with pytest.raises(ImportError, match="pip install datasets"):
        prepare.prepare("hub", tmp_path / "out", tasks=["gsm8k"])


def test_prepare_manifest_policy_and_determinism(shared_data, mixture, tmp_path):
    manifest = json.loads((mixture / "manifest.json").read_text())
    assert manifest["seed"] == 20 and manifest["asked"] == {"train": 1800, "selection": 200, "test": 500}
    assert sorted(manifest["tasks"]) == sorted(p.name for p in shared_data.iterdir() if p.is_dir())
    # hand count: sciq has 1000 test rows (500 kept for test) and 1000 validation rows = 200 selection + 800 train
    assert manifest["tasks"]["sciq"]["sizes"] == {"train": 800, "selection": 200, "test": 500}
    assert "short" in manifest["tasks"]["sciq"] and "short" not in manifest["tasks"]["gsm8k"]
    assert manifest["tasks"]["arc_easy"]["test_from"] == "the hub's test split"
    assert manifest["tasks"]["boolq"]["test_from"] == "the pooled splits"
    assert {s["source"]: s["rows"] for s in manifest["tasks"]["gsm8k"]["sources"]} == {
        str(shared_data.resolve() / "gsm8k/train.jsonl"): 7473, str(shared_data.resolve() / "gsm8k/test.jsonl"): 1319}
    # arc_easy: test only from the hub's test rows, train + selection only from train + validation, no row twice
    mix = data.load_mixture(mixture)
    def conv(split):
        return Counter(prepare.convert("arc_easy", r) for r in data.read_jsonl(shared_data / f"arc_easy/{split}.jsonl"))
    assert not Counter(mix["arc_easy"]["test"]) - conv("test")
    assert not Counter(mix["arc_easy"]["train"] + mix["arc_easy"]["selection"]) - (conv("train") + conv("validation"))
    # a second run writes the same bytes
    with pytest.warns(UserWarning, match="sciq"):
        prepare.prepare(str(shared_data), tmp_path)
    files = sorted(p.relative_to(mixture) for p in mixture.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((mixture / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


def test_cli_on_a_users_own_task(tmp_path):
    rows = [{"question": f"Is {n} even?", "answer": "A" if n % 2 == 0 else "B", "choices": ["yes", "no"]}
            for n in range(10)]
    write_jsonl(tmp_path / "src/parity/train.jsonl", rows)
    cmd = [sys.executable, str(REPO / "data.py"), "prepare", "--source", str(tmp_path / "src"),
           "--out", str(tmp_path / "out"), "--train", "6", "--selection", "2", "--test", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    mix = data.load_mixture(tmp_path / "out")
    assert Counter(ex for split in mix["parity"].values() for ex in split) == Counter(map(data.from_plain, rows))
    assert json.loads((tmp_path / "out/manifest.json").read_text())["tasks"]["parity"]["schema"] == "plain"


def test_help_lists_the_tasks_with_their_hub_ids_and_the_defaults(command):
    for args in (["--help"], ["prepare", "--help"]):
        code, out, err = command("data.py", *args)
        assert code == 0, err
        assert all(task in out and hub_id in out for task, (hub_id, _) in prepare.HUB.items())
    assert "(default: 1800)" in out and "(default: 20)" in out


@pytest.mark.parametrize("flag, value, msg", [
    ("--train", "0", "argument --train: expected a finite int >= 1, got '0'"),
    ("--seed", "-1", "argument --seed: expected a finite int >= 0, got '-1'"),
    ("--test", "ten", "argument --test: invalid int value: 'ten'"),
])
def test_bad_flags_are_refused_naming_them(refused, tmp_path, flag, value, msg):
    assert msg in refused("data.py", "prepare", "--source", tmp_path, "--out", tmp_path / "out", flag, value)


def test_a_failed_prepare_leaves_the_old_folder_as_it_was(src, tmp_path, monkeypatch):
    out = tmp_path / "mix"
    small(src, out, seed=0)
    before = snapshot(out)
    # the third task fails to convert
    dir_splits = prepare._dir_splits

    def third_task_fails(folder):
        if folder.name == "c":
            raise ValueError("injected")
        return dir_splits(folder)
    monkeypatch.setattr(prepare, "_dir_splits", third_task_fails)
    with pytest.raises(ValueError, match="injected"):
        small(src, out, seed=1)
    monkeypatch.undo()
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mix", "src"]
    # the disk fills at the third file written: what was written is given back, and the error names the folder
    write_text, written = Path.write_text, []

    def full_at_third_file(path, *args, **kw):
        written.append(path)
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, *args, **kw)
    monkeypatch.setattr(Path, "write_text", full_at_third_file)
    with pytest.raises(OSError, match="(?i)no space left") as e:
        small(src, out, seed=1)
    monkeypatch.undo()
    assert e.value.filename == str(out.resolve())
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mix", "src"]
    # a prepare that succeeds replaces the folder whole: the task it leaves out is gone, not left beside the others
    small(src, out, seed=1, tasks=["a", "b"])
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix", "src"] and snapshot(out) != before


def test_a_killed_prepares_leftovers_go_with_the_next_prepare(src, tmp_path):
    out = tmp_path / "mix"
    # killed while writing: a temporary folder holding a file cut short
    (tmp_path / ".mix.tmp" / "a").mkdir(parents=True)
    (tmp_path / ".mix.tmp" / "a" / "train.jsonl").write_text('{"question": "cut sh')
    small(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix", "src"]
    # killed between its two renames: the old folder set aside as .mix.old, no mix; kept until a prepare succeeds
    before = snapshot(out)
    os.replace(out, tmp_path / ".mix.old")
    small(src, out, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix", "src"] and snapshot(out) != before
    # killed after them: a stale .mix.old beside the new mix
    shutil.copytree(out, tmp_path / ".mix.old")
    small(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix", "src"] and snapshot(out) == before


def test_an_out_folder_that_is_not_a_mixture_is_refused(src, tmp_path, refused):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    line = refused("data.py", "prepare", "--source", src, "--out", tmp_path / "notes", "--train", 6, "--selection", 2,
                   "--test", 2)
    assert f"--out {tmp_path / 'notes'}: exists and is not a mixture folder" in line
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_full_disk_leaves_the_old_mixture_and_says_so_in_one_line(src, tmp_path, refused):
    disk = tmp_path / "disk"
    disk.mkdir()
    if sys.platform != "linux" or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs Linux and mount")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        small(src, disk / "mix")
        before = snapshot(disk / "mix")
        write_jsonl(tmp_path / "big" / "long" / "train.jsonl", [  # ~120 KB of rows for a 64 KB disk
            {"question": f"{n} " + "x" * 2000, "answer": "A", "choices": ["x", "y"]} for n in range(60)])
        line = refused("data.py", "prepare", "--source", tmp_path / "big", "--out", disk / "mix", "--train", 50,
                       "--selection", 5, "--test", 5)
        assert line.startswith(f"error: {disk / 'mix'}: no space left on the device (")
        assert snapshot(disk / "mix") == before and sorted(p.name for p in disk.iterdir()) == ["mix"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
