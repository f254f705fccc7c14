"""Pins data.py: the ten converters in the release's task formats (real rows from ../shared/data, hand-made hub rows
for aqua_rat, winogrande and medmcqa; prompts and targets written out by hand), every real row's trained target read
back by evaluate.py's answer rule as its gold, the loss mask (decoded back to the target with the real SmolLM2
tokenizer), the mixture sampler's properties (hypothesis), bad-input errors, `prepare` (manifest, policy,
byte-for-byte determinism) and the padding figure on the real mixture (> 0.8 real tokens). At the door: `data.py`
refuses bad flags and files with one line naming them, its --help lists the tasks and defaults, a mixture folder is
replaced whole or not at all (a failure mid-way, a killed run's leftovers, a full disk on a small tmpfs), and
manifest, tokenizer and JSON files that are not JSON or not UTF-8 are named.

Run: cd /work/main && python -m pytest -q tests/test_data.py
"""
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, models

import data
import evaluate as ev
from data import Example, LETTERS

REPO = Path(__file__).resolve().parents[1]


def first_row(path, pred=lambda r: True):
    return next(r for r in map(json.loads, open(path, encoding="utf-8")) if pred(r))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# -----------------------------------------------------------------------------
# converters

def test_converters_on_first_real_rows(shared_data):
    # expected values written by hand from the first row of each file
    row = first_row(shared_data / "commonsense_qa/train.jsonl")
    assert data.convert("commonsense_qa", row) == Example(
        "The sanctions against the school were a punishing blow, and they seemed to what the efforts the school "
        "had made to change?", "A", ("ignore", "enforce", "authoritarian", "yell at", "avoid"))
    row = first_row(shared_data / "openbookqa/train.jsonl")
    assert data.convert("openbookqa", row) == Example("The sun is responsible for", "D", (
        "puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
        "plants sprouting, blooming and wilting"))
    row = first_row(shared_data / "gsm8k/train.jsonl")
    assert data.convert("gsm8k", row) == Example(
        row["question"], "72", None, "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                                     "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    row = first_row(shared_data / "gsm8k/train.jsonl", lambda r: r["answer"].endswith("#### 1,080"))
    assert data.convert("gsm8k", row).answer == "1,080"  # as the trained text writes it
    row = first_row(shared_data / "hellaswag/validation.jsonl")
    assert data.convert("hellaswag", row) == Example('"A man is sitting on a roof. he"', "D", (
        '"is using wrap to wrap a pair of skis."', '"is ripping level tiles off."', '"is holding a rubik\'s cube."',
        '"starts pulling up roofing on a roof."'))
    row = first_row(shared_data / "boolq/train.jsonl")
    ex = data.convert("boolq", row)
    assert ex.answer == "True" and ex.choices is None
    assert ex.question == row["passage"] + "\nare bok choy and pak choi the same?"
    row = first_row(shared_data / "arc_easy/train.jsonl", lambda r: r["choices"]["label"][0] == "1")
    ex = data.convert("arc_easy", row)
    assert ex.answer == "ABCDE"[int(row["answerKey"]) - 1] and ex.choices == tuple(row["choices"]["text"])
    row = first_row(shared_data / "sciq/validation.jsonl")
    assert data.convert("sciq", row) == Example(row["question"], "darwin")


def test_release_formats_written_out(shared_data):
    # the whole training text of each task's first real row, written by hand from SPEC section 9's formats
    text = lambda task, path: (lambda ex: data.format_prompt(ex) + data.format_target(ex))(
        data.convert(task, first_row(shared_data / path)))
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
            ex = data.convert(task, row)
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
    ex = data.convert("aqua_rat", aqua)
    assert data.format_prompt(ex) + data.format_target(ex) == (
        "Q: Two trains travel 60 km at 30 km/h. How many hours?\noptions: A. 1, B. 2, C. 3\n"
        "A: 60 / 30 = 2 hours.\nANSWER: B #### B")
    wino = {"sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
            "option1": "trophy", "option2": "suitcase", "answer": "1"}
    ex = data.convert("winogrande", wino)
    assert data.format_prompt(ex) + data.format_target(ex) == (
        "Q: The trophy doesn't fit into the suitcase because the _ is too large.\n"
        "options: A. trophy , B. suitcase \nA: #### A")
    assert data.convert("winogrande", {**wino, "answer": "2"}).answer == "B"
    med = {"id": "x1", "question": "Which vitamin deficiency causes scurvy?", "opa": "A", "opb": "B12", "opc": "C",
           "opd": "D", "cop": 2, "choice_type": "single", "exp": "Vitamin C.", "subject_name": "Biochemistry"}
    ex = data.convert("medmcqa", med)
    assert data.format_prompt(ex) + data.format_target(ex) == (
        "Q: Which vitamin deficiency causes scurvy?\noptions: A. A, B. B12, C. C, D. D\nA: #### C")
    # the hub's unlabelled test rows fail loudly instead of training on a made-up label
    for task, row in (("winogrande", {**wino, "answer": ""}), ("medmcqa", {**med, "cop": -1}),
                      ("hellaswag", {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": ""}),
                      ("aqua_rat", {**aqua, "correct": "E"}), ("aqua_rat", {**aqua, "options": ["A)1", "C)2"]})):
        with pytest.raises(ValueError):
            data.convert(task, row)


# -----------------------------------------------------------------------------
# formatting, tokenization, the loss mask, collate

def test_format_exact():
    ex = Example("What is 2 + 2?", "B", ("3", "4", "5"))
    assert data.format_prompt(ex) == "Q: What is 2 + 2?\noptions: A. 3, B. 4, C. 5\nA:"
    assert data.format_target(ex) == " #### B"
    ex = Example("Tom has 3 apples and buys 2. How many?", "5", None, "3 + 2 = 5.\n#### 5")
    assert data.format_prompt(ex) == "Q: Tom has 3 apples and buys 2. How many?\nA:"
    assert data.format_target(ex) == " 3 + 2 = 5.\n#### 5"
    ex = Example("x?", "A", ("1", "2"), "because #### A")
    assert data.format_prompt(ex) + data.format_target(ex) == "Q: x?\noptions: A. 1, B. 2\nA: because #### A"
    # a rationale must end with its answer, the only "####" in it: evaluation reads the first one
    for bad in ("because", "because #### B", "#### A, so #### A"):
        with pytest.raises(ValueError, match="rationale must end with '#### A'"):
            Example("x?", "A", ("1", "2"), bad)


def test_loss_mask_is_exactly_target_and_eos(shared_data, smollm2):
    tok, eos = data.load_tokenizer(smollm2)
    assert eos == tok.token_to_id("<|im_end|>")  # SmolLM2's config says 2 = <|im_end|>
    for task, split in (("gsm8k", "train"), ("commonsense_qa", "train"), ("boolq", "train")):
        ex = data.convert(task, first_row(shared_data / task / f"{split}.jsonl"))
        ids, labels = data.encode_example(tok, eos, ex, 4096)
        n_prompt = sum(1 for lab in labels if lab == -100)
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tok.decode(labels[n_prompt:-1]) == data.format_target(ex)
        assert tok.decode(ids[:n_prompt]) == data.format_prompt(ex)
        # the drop policy: one token too many is None, exactly enough fits
        assert data.encode_example(tok, eos, ex, len(ids) - 1) is None
        assert data.encode_example(tok, eos, ex, len(ids)) == (ids, labels)


def test_load_tokenizer_eos_sources(smollm2, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(smollm2 / "tokenizer.json")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="eos"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok, eos = data.load_tokenizer(tmp_path)
    assert eos == tok.token_to_id("<|endoftext|>") == 0


def test_collate_shifts_and_pads():
    encoded = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10], [-100, 10])]
    idx, targets = data.collate(encoded, pad_id=0)
    assert idx.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert targets.tolist() == [[-100, 7, 8], [10, -100, -100]]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), world=st.integers(1, 8), micro=st.integers(1, 16))
def test_micro_batches_deal_every_row_once_in_equal_counts(n, world, micro):
    parts = data.micro_batches(n, world, micro)
    k = math.ceil(n / (world * micro))
    assert len(parts) == world and all(len(p) == k for p in parts)  # every rank runs k passes
    flat = [p for j in range(k) for r in range(world) for p in [parts[r][j]]]  # back in the order they were cut
    assert [i for p in flat for i in p] == list(range(n))  # contiguous runs of the sorted batch, each row once
    sizes = [len(p) for p in flat]
    assert max(sizes) <= micro and max(sizes) - min(sizes) <= 1


# -----------------------------------------------------------------------------
# the sampler

sizes_st = st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(1, 25), min_size=1, max_size=5)


def draw_passes(s, passes):
    """The batches of the next `passes` passes, each a list of batches."""
    out = []
    for _ in range(passes):
        batches, n = [], 0
        while n < s.size:
            batches.append(s.next_batch())
            n += len(batches[-1])
        out.append(batches)
    return out


@settings(max_examples=100, deadline=None)
@given(sizes=sizes_st, batch=st.integers(1, 20), seed=st.integers(0, 2**32), weighted=st.booleans())
def test_an_epoch_is_one_pass_its_last_step_takes_what_is_left(sizes, batch, seed, weighted):
    s = data.MixtureSampler(sizes, batch, seed)
    total = sum(sizes.values())
    if weighted:
        s.set_weights({t: 1.0 + j for j, t in enumerate(sorted(sizes))})
    for batches in draw_passes(s, 3):
        # full batches, then what is left: exactly one epoch of examples
        assert [len(b) for b in batches] == [batch] * (total // batch) + ([total % batch] if total % batch else [])
        if not weighted:  # every example exactly once a pass
            assert sorted(x for b in batches for x in b) == sorted((t, i) for t, n in sizes.items() for i in range(n))


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, seed=st.integers(0, 1000), before=st.integers(0, 10), mask=st.integers(1, 31),
       weighted=st.booleans())
def test_excluded_tasks_never_appear_and_a_new_pass_starts(sizes, seed, before, mask, weighted):
    names = sorted(sizes)
    keep = [t for j, t in enumerate(names) if mask >> j & 1] or names[-1:]
    s = data.MixtureSampler(sizes, 4, seed)
    if weighted:
        s.set_weights({t: 1.0 for t in names})
    for _ in range(before):
        s.next_batch()
    s.set_active(keep)
    assert s.size == sum(sizes[t] for t in keep)
    for batches in draw_passes(s, 2):  # whole passes over the kept tasks, from the first draw on
        assert {t for b in batches for t, _ in b} <= set(keep)
        assert sum(map(len, batches)) == s.size


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, seed=st.integers(0, 1000), data_=st.data())
def test_skipped_examples_are_left_out_of_the_passes(sizes, seed, data_):
    every = [(t, i) for t, n in sizes.items() for i in range(n)]
    skip = data_.draw(st.sets(st.sampled_from(every), min_size=1, max_size=len(every) - 1)) if len(every) > 1 else set()
    s = data.MixtureSampler(sizes, 3, seed)
    s.next_batch()
    s.set_skip(skip)
    (batches,) = draw_passes(s, 1)
    assert sorted(x for b in batches for x in b) == sorted(set(every) - skip)
    assert s.size == len(every) - len(skip) and all(len(b) <= 3 for b in batches)


def test_same_seed_same_order_other_seed_other_order():
    sizes = {"a": 50, "b": 30, "c": 20}
    run = lambda seed: [data.MixtureSampler(sizes, 8, seed).next_batch() for _ in range(30)]
    first = data.MixtureSampler(sizes, 8, 20)
    assert run(20) == run(20) and run(20) != run(21)
    assert draw_passes(first, 2)[0] != draw_passes(first, 1)[0]  # every pass is shuffled anew


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, seed=st.integers(0, 1000),
       ops=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 31), st.floats(0.1, 3)), min_size=1, max_size=12),
       cut=st.integers(0, 12))
def test_state_dict_round_trip_continues_identically(sizes, seed, ops, cut):
    names = sorted(sizes)
    s = data.MixtureSampler(sizes, 2, seed)
    for n, (kind, mask, w) in enumerate(ops):
        if n == cut:
            break
        if kind == 0:
            s.next_batch()
        elif kind == 1:
            s.set_active([t for j, t in enumerate(names) if mask >> j & 1] or names[:1])
        elif kind == 2:
            s.set_weights({t: w + j for j, t in enumerate(names)})
        elif kind == 3:
            s.set_weights(None)
        else:
            s.set_skip([(names[0], 0)] if mask % 2 and sizes[names[0]] > 1 else [])
    saved = json.dumps(s.state_dict())  # plain JSON, as a killed run writes it
    resumed = data.MixtureSampler(sizes, 2, seed)
    resumed.load_state_dict(json.loads(saved))
    assert [s.next_batch() for _ in range(15)] == [resumed.next_batch() for _ in range(15)]
    assert s.state_dict() == resumed.state_dict()


@pytest.mark.parametrize("weights", [{"a": 1, "b": 2, "c": 5}, {"a": 1, "b": 0, "c": 1}, {"a": 0.2, "b": 0.2, "c": 3}])
def test_weights_move_task_frequencies(weights):
    sizes = {"a": 100, "b": 300, "c": 100}
    s = data.MixtureSampler(sizes, 64, 20)
    s.set_weights(weights)
    draws = [item for _ in range(300) for item in s.next_batch()]
    freq = Counter(t for t, _ in draws)
    for t, w in weights.items():  # about 19,000 draws: the binomial sd is under 0.004
        assert abs(freq[t] / len(draws) - w / sum(weights.values())) < 0.02
    # within a task the examples still come without repeats until the task is used up
    a = [i for t, i in draws if t == "a"]
    assert sorted(a[:100]) == list(range(100))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        data.MixtureSampler({"a": 3}, 0, 0)
    s = data.MixtureSampler({"a": 3, "b": 4}, 2, 0)
    with pytest.raises(ValueError, match="unknown task 'z'"):
        s.set_active(["a", "z"])
    with pytest.raises(ValueError, match=">= 0"):
        s.set_weights({"a": -1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"no example \('a', 3\) to skip"):
        s.set_skip([("a", 3)])
    s.set_weights({"a": 1.0})
    with pytest.raises(ValueError, match="'b' has no weight"):
        s.next_batch()
    s.set_active([])
    with pytest.raises(ValueError, match="no active example"):
        s.next_batch()
    with pytest.raises(ValueError, match="sizes"):
        data.MixtureSampler({"a": 4}, 2, 0).load_state_dict(s.state_dict())


# -----------------------------------------------------------------------------
# bad input

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n{"question": "e",\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        data.read_jsonl(path)
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: empty line"):
        data.read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        data.read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": 2}\n\n\n')
    assert data.read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_bad_rows_and_names_fail_before_training(shared_data, tmp_path):
    row = first_row(shared_data / "commonsense_qa/train.jsonl")
    src = tmp_path / "src"
    write_jsonl(src / "commonsense_qa/train.jsonl", [row, {k: v for k, v in row.items() if k != "answerKey"}])
    with pytest.raises(ValueError, match=r"commonsense_qa/train.jsonl:2: missing field 'answerKey'"):
        data.prepare(str(src), tmp_path / "out", n_train=1, n_selection=1, n_test=1)
    write_jsonl(src / "commonsense_qa/train.jsonl", [row, {**row, "answerKey": "F"}])
    with pytest.raises(ValueError, match=r"train.jsonl:2: answerKey 'F' is not one of the labels"):
        data.prepare(str(src), tmp_path / "out", n_train=1, n_selection=1, n_test=1)
    write_jsonl(src / "commonsense_qa/train.jsonl", [])
    with pytest.raises(ValueError, match="train.jsonl: empty split"):
        data.prepare(str(src), tmp_path / "out", n_train=1, n_selection=1, n_test=1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        data.prepare(str(src), tmp_path / "out", tasks=["nope"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        data.prepare("hub", tmp_path / "out", tasks=["nope"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        data.convert("nope", row)
    with pytest.raises(ValueError, match="answer 'E' is not one of the choice letters A-D"):
        data.from_plain({"question": "q", "answer": "E", "choices": ["1", "2", "3", "4"]})
    with pytest.raises(ValueError, match="--selection must be a positive integer"):
        data.prepare(str(src), tmp_path / "out", n_selection=0)


def test_hub_source_without_datasets_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails, installed or not
    with pytest.raises(ImportError, match="pip install datasets"):
        data.prepare("hub", tmp_path / "out", tasks=["gsm8k"])


# -----------------------------------------------------------------------------
# prepare and load on the real rows

@pytest.fixture(scope="module")
def mixture(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture")
    with pytest.warns(UserWarning, match="sciq: asked for train 1800, only 800 rows"):
        data.prepare(str(shared_data), out)
    return out


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
        return Counter(data.convert("arc_easy", r) for r in data.read_jsonl(shared_data / f"arc_easy/{split}.jsonl"))
    assert not Counter(mix["arc_easy"]["test"]) - conv("test")
    assert not Counter(mix["arc_easy"]["train"] + mix["arc_easy"]["selection"]) - (conv("train") + conv("validation"))
    # a second run writes the same bytes
    with pytest.warns(UserWarning, match="sciq"):
        data.prepare(str(shared_data), tmp_path)
    files = sorted(p.relative_to(mixture) for p in mixture.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((mixture / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


def test_load_mixture_validates(mixture, tmp_path):
    assert list(data.load_mixture(mixture, ["gsm8k"])) == ["gsm8k"]
    with pytest.raises(ValueError, match="unknown task 'medmcqa'"):
        data.load_mixture(mixture, ["medmcqa"])
    copy = tmp_path / "m"
    (copy / "sciq").mkdir(parents=True)
    manifest = json.loads((mixture / "manifest.json").read_text())
    manifest["tasks"] = {"sciq": manifest["tasks"]["sciq"]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for split in data.SPLITS:
        (copy / "sciq" / f"{split}.jsonl").write_bytes((mixture / "sciq" / f"{split}.jsonl").read_bytes())
    (copy / "sciq/selection.jsonl").write_text("")
    with pytest.raises(ValueError, match="selection.jsonl: empty split"):
        data.load_mixture(copy)


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


# -----------------------------------------------------------------------------
# at the door: flags, a folder replaced whole or not at all, files that are not what they should be

def test_help_lists_the_tasks_with_their_hub_ids_and_the_defaults():
    for args in (["--help"], ["prepare", "--help"]):
        run = subprocess.run([sys.executable, str(REPO / "data.py"), *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert all(task in run.stdout and hub_id in run.stdout for task, (hub_id, _) in data.HUB.items())
    assert "(default: 1800)" in run.stdout and "(default: 20)" in run.stdout


@pytest.mark.parametrize("flag, value, msg", [
    ("--train", "0", "argument --train: expected a finite int >= 1, got '0'"),
    ("--seed", "-1", "argument --seed: expected a finite int >= 0, got '-1'"),
    ("--test", "ten", "argument --test: invalid int value: 'ten'"),
])
def test_bad_flags_are_refused_naming_them(refused, tmp_path, flag, value, msg):
    assert msg in refused("data.py", "prepare", "--source", tmp_path, "--out", tmp_path / "out", flag, value)


@pytest.fixture
def src(tmp_path):
    """Three small tasks of plain rows, DIR/{a,b,c}/train.jsonl."""
    for task in "abc":
        write_jsonl(tmp_path / "src" / task / "train.jsonl", [
            {"question": f"Is {task}{n} odd?", "answer": "AB"[n % 2], "choices": ["no", "yes"]} for n in range(10)])
    return tmp_path / "src"


def small(src, out, **kw):
    return data.prepare(str(src), out, n_train=6, n_selection=2, n_test=2, **kw)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_failed_prepare_leaves_the_old_folder_as_it_was(src, tmp_path, monkeypatch):
    out = tmp_path / "mix"
    small(src, out, seed=0)
    before = snapshot(out)
    # the third task fails to convert
    dir_splits = data._dir_splits

    def third_task_fails(folder):
        if folder.name == "c":
            raise ValueError("injected")
        return dir_splits(folder)
    monkeypatch.setattr(data, "_dir_splits", third_task_fails)
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
    with pytest.raises(OSError, match="No space left") as e:
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
        assert line == f"error: {disk / 'mix'}: No space left on device"
        assert snapshot(disk / "mix") == before and sorted(p.name for p in disk.iterdir()) == ["mix"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_bad_manifest_tokenizer_and_json_files_are_named(src, tmp_path, refused):
    out = tmp_path / "mix"
    small(src, out)
    manifest = out / "manifest.json"
    for raw, msg in ((b'{"tasks": ', "not valid JSON (Expecting value at line 1, column 11)"),
                     (b'["a"]', "expected a JSON object, got list"),
                     (b'{"seed": 20}', "not a mixture manifest"),
                     (b'{"tasks": {"a": {"sizes": {"train": 6}}}}', "not a mixture manifest"),
                     (b'{"source": "caf\xe9"}', "not valid UTF-8 (invalid continuation byte at byte 15)")):
        manifest.write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(f"{manifest}: {msg}")):
            data.load_mixture(out)
    # a tokenizer folder: tokenizer.json missing, not a tokenizer; its JSON files not UTF-8, not JSON
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tok / 'tokenizer.json'}: no such file")):
        data.load_tokenizer(tok)
    (tok / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=re.escape(f"{tok / 'tokenizer.json'}: not a readable tokenizer")):
        data.load_tokenizer(tok)
    Tokenizer(models.BPE({"a": 0, "<eos>": 1}, [])).save(str(tok / "tokenizer.json"))
    assert data.load_tokenizer(tok)[1] == 1
    (tok / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"{tok / 'tokenizer_config.json'}: not valid UTF-8")):
        data.load_tokenizer(tok)
    (tok / "config.json").write_text('{"eos_token_id": 1,}')
    with pytest.raises(ValueError, match=re.escape(f"{tok / 'config.json'}: not valid JSON")):
        data.load_tokenizer(tok)
    # a row file that is JSON text but not UTF-8 bytes, through the command
    (src / "a" / "train.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "A", "choices": ["x", "y"]}\n')
    line = refused("data.py", "prepare", "--source", src, "--out", out, "--train", 6, "--selection", 2, "--test", 2)
    assert f"error: {src / 'a' / 'train.jsonl'}: cannot read as UTF-8 text" in line


# -----------------------------------------------------------------------------
# the real mixture through the real tokenizer: speed, drops, separate = joint tokenization, padding

def test_real_mixture_tokenizes_fast_and_pads_little(mixture, smollm2):
    tok, eos = data.load_tokenizer(smollm2)
    mix = data.load_mixture(mixture)
    t0 = time.time()
    encoded = {t: data.encode_examples(tok, eos, m["train"], 512) for t, m in mix.items()}
    assert time.time() - t0 < 30, "tokenizing ~12k examples must take seconds"
    dropped = {t: sum(e is None for e in enc) for t, enc in encoded.items()}
    assert sum(dropped.values()) < 0.01 * sum(len(e) for e in encoded.values()), dropped
    # tokenizing prompt and target apart gives the same ids as tokenizing the whole text at once
    for t, m in mix.items():
        joint = tok.encode_batch([data.format_prompt(ex) + data.format_target(ex) for ex in m["train"]])
        assert all(e is None or e[0] == j.ids + [eos] for e, j in zip(encoded[t], joint))
    kept = {t: [e for e in enc if e is not None] for t, enc in encoded.items()}
    sampler = data.MixtureSampler({t: len(e) for t, e in kept.items()}, 64, 20)
    real = padded = drawn = 0
    while drawn < sampler.size:  # one epoch, cut as train.py cuts it: length-sorted micro-batches of 8
        batch = sorted((kept[t][i] for t, i in sampler.next_batch()), key=lambda e: len(e[0]))
        drawn += len(batch)
        for part in data.micro_batches(len(batch), 1, 8)[0]:
            idx, targets = data.collate([batch[i] for i in part], eos)
            real += sum(len(batch[i][0]) - 1 for i in part)
            padded += idx.numel()
    print(f"real-token fraction over one epoch: {real / padded:.3f}, dropped over 512 tokens: {dropped}")
    assert real / padded > 0.8  # measured 0.842: the long boolq passages and gsm8k rationales pad their neighbours
