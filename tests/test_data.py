"""Pins data.py: the training text and its loss mask (decoded back to the target with the real SmolLM2 tokenizer),
collate and micro-batches, the mixture sampler's properties (hypothesis; with baselines.Sampler's skipped examples
and weights), bad-input errors naming file and line, mixture folders checked when loaded, manifest, tokenizer and
JSON files that are not JSON or not UTF-8 named, and the padding figure on the real mixture (> 0.8 real tokens).

Run: python -m pytest -q tests/test_data.py
"""
import json
import math
import random
import re
import time
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, models

import data
import prepare
from baselines import Sampler
from conftest import first_row, small
from data import Example

# -----------------------------------------------------------------------------
# converters

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
        ex = prepare.convert(task, first_row(shared_data / task / f"{split}.jsonl"))
        ids, labels = data.encode_examples(tok, eos, [ex], 4096)[0]
        n_prompt = sum(1 for lab in labels if lab == -100)
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tok.decode(labels[n_prompt:-1]) == data.format_target(ex)
        assert tok.decode(ids[:n_prompt]) == data.format_prompt(ex)
        # the drop policy: one token too many is None, exactly enough fits
        assert data.encode_examples(tok, eos, [ex], len(ids) - 1)[0] is None
        assert data.encode_examples(tok, eos, [ex], len(ids))[0] == (ids, labels)


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
    s = (Sampler if weighted else data.MixtureSampler)(sizes, batch, seed)
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
    s = (Sampler if weighted else data.MixtureSampler)(sizes, 4, seed)
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
    s = Sampler(sizes, 3, seed)
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
    s = Sampler(sizes, 2, seed)
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
    resumed = Sampler(sizes, 2, seed)
    resumed.load_state_dict(json.loads(saved))
    assert [s.next_batch() for _ in range(15)] == [resumed.next_batch() for _ in range(15)]
    assert s.state_dict() == resumed.state_dict()


@pytest.mark.parametrize("weights", [{"a": 1, "b": 2, "c": 5}, {"a": 1, "b": 0, "c": 1}, {"a": 0.2, "b": 0.2, "c": 3}])
def test_weights_move_task_frequencies(weights):
    sizes = {"a": 100, "b": 300, "c": 100}
    s = Sampler(sizes, 64, 20)
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
    s = Sampler({"a": 3, "b": 4}, 2, 0)
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


# -----------------------------------------------------------------------------
# prepare and load on the real rows

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


# -----------------------------------------------------------------------------
# at the door: flags, a folder replaced whole or not at all, files that are not what they should be

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


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=40))
def test_pack_places_every_example_once_within_its_rows_length(lengths):
    capacity = max(lengths)
    rows = data.pack(lengths, capacity)
    assert sorted(j for row in rows for j in row) == list(range(len(lengths)))
    assert all(sum(lengths[j] for j in row) <= capacity for row in rows)
    # first fit, longest first: every row but one is more than half full
    assert sum(sum(lengths[j] for j in row) <= capacity / 2 for row in rows) <= 1


def test_collate_packed_lays_each_example_out_whole_with_its_own_positions():
    encoded = [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10], [-100, 10]), ([11, 12, 13], [-100, 12, 13])]
    idx, targets, pos, docs = data.collate_packed(encoded, [[0], [2, 1]], pad_id=0)
    assert idx.tolist() == [[5, 6, 7], [11, 12, 9]]
    assert targets.tolist() == [[-100, 7, 8], [12, 13, 10]]
    assert pos.tolist() == [[0, 1, 2], [0, 1, 0]] and docs.tolist() == [[0, 0, 0], [2, 2, 1]]
    idx, targets, pos, docs = data.collate_packed(encoded, [[0], [1]], pad_id=0)
    assert idx.tolist() == [[5, 6, 7], [9, 0, 0]] and docs.tolist() == [[0, 0, 0], [1, -1, -1]]
    assert targets.tolist() == [[-100, 7, 8], [10, -100, -100]]


def test_a_step_is_packed_only_where_packing_saves_a_tenth_of_the_positions():
    """One rank: the padded layout runs, per pass of length-sorted examples (cut as micro_batches cuts them), its
    examples x its longest; the packed one, per pass of rows, its rows x its fullest row. Packed exactly when that
    is at most 9/10 of padded; either way every example runs once, and the positions are the ones counted."""
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        lengths = [rng.choice([rng.randint(2, 12), rng.randint(40, 60)]) for _ in range(rng.randint(1, 24))]
        micro = rng.choice([1, 2, 4, 8])
        encoded = [(list(range(1, n + 2)), [-100] + list(range(2, n + 2))) for n in lengths]  # n positions each
        cost = lambda sizes: sum(len(p) * max(sizes[i] for i in p) for p in data.micro_batches(len(sizes), 1, micro)[0])
        padded = cost(sorted(lengths))
        packed = cost([sum(lengths[j] for j in row) for row in data.pack(lengths, max(lengths))])
        passes = data.forward_passes(encoded, 0, 1, micro, 0)
        took_packed = passes[0][1][3] is not None
        assert took_packed == (10 * packed <= 9 * padded), (lengths, micro)
        assert sum(t[1][0].numel() for t in passes) == (packed if took_packed else padded)
        assert sorted(j for part, _ in passes for j in part) == list(range(len(lengths)))
        seen.add(took_packed)
    assert seen == {True, False}  # both layouts were taken
