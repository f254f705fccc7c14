"""Pins evaluate.py: reading and comparing answers (SPEC section 7) on hand-made edge cases; few-shot prompts that
never show the asked question (by content), fixed by the seed; cached, batched, prefix-shared, left-padded greedy
decoding with early exit equal token for token to a plain full-forward loop one sequence at a time; the gold-target
loss equal to a direct teacher-forced computation; W simulated ranks summing to one rank; bad input rejected with a
message naming it; and, on real rows with the real SmolLM2 checkpoint, decoding and accuracy equal to
model.generate run one question at a time."""
import json
import random
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

import evaluate as ev
from data import Example, convert, encode_prompts, format_prompt, format_target, load_tokenizer, read_jsonl
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEQ0123456789 \n:#.,?"


# -----------------------------------------------------------------------------
# fixtures: a character tokenizer, a tiny random model, synthetic tasks


@pytest.fixture(scope="module")
def chartok():
    """One token per character, plus <eos>: every string of CHARS round-trips exactly."""
    vocab = {c: i for i, c in enumerate(CHARS)} | {"<eos>": len(CHARS)}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.add_special_tokens(["<eos>"])
    tok.decoder = decoders.Fuse()
    return tok, vocab["<eos>"]


@pytest.fixture(scope="module")
def tiny(chartok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(CHARS) + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # large weights: outputs depend on the question, and greedy choices are far from ties
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.4 * torch.randn_like(p))
    return model


def words(rng, n):
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 6))) for _ in range(n))


def synthetic(seed, n, rationale=False):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = words(rng, rng.randint(2, 9)) + "?"
        if rationale:
            a = str(rng.randint(0, 99))
            out.append(Example(q, a, None, words(rng, rng.randint(1, 5)) + f". #### {a}"))
        else:
            k = rng.randint(2, 4)
            out.append(Example(q, "ABCD"[rng.randrange(k)], tuple(words(rng, 2) for _ in range(k))))
    return out


def reference_greedy(model, ids, eos_id, tok, stop, max_new):
    """Greedy decoding the slow, obvious way: one sequence, the whole sequence through the model every step."""
    gen = []
    with torch.no_grad():
        while True:
            t = model(torch.tensor([ids + gen]))[0, -1].argmax().item()
            gen.append(t)
            if t == eos_id or len(gen) == max_new or (stop is not None and stop in tok.decode(gen)):
                return gen


# -----------------------------------------------------------------------------
# answers


@pytest.mark.parametrize("text, answer", [
    (" #### B\n\nQ:", "B"),
    (" she has 3 + 4 = 7 apples #### 7", "7"),
    (" no marker here", None),
    (" ####   \nthen text", None),               # nothing after the marker on its line
    (" #### 12 #### 13", "12"),                    # several markers: the first answer counts
    (" first #### 5\nsecond #### 6", "5"),
    ("####-3.5", "-3.5"),
    (" #### $1,000.\n", "$1,000."),               # extraction keeps the text; comparison normalises it
])
def test_extract_answer(text, answer):
    assert ev.extract_answer(text) == answer


@pytest.mark.parametrize("pred, gold, same", [
    ("1,000", "1000.0", True),
    ("$1,000", "1000", True),
    ("18.", "18", True),                          # trailing period
    ("-7", "-7.0", True),
    ("-7", "7", False),
    ("0.5", ".5", True),
    ("0.5", "0.50001", False),
    ("3", "3.5", False),
    (" b ", "B", True),                           # case and whitespace
    ("B.", "B", True),
    ("B", "C", False),
    ("Yes", "yes", True),
    ("1", "one", False),                          # a number never equals a word
    ("1e3", "1000", False),                       # not a plain number: compared as strings
    (None, "B", False),                           # no "####" in the output
])
def test_is_correct(pred, gold, same):
    assert ev.is_correct(pred, gold) is same


# -----------------------------------------------------------------------------
# prompts


def test_few_shot_prompts_format_seed_and_no_leak():
    train = synthetic(1, 40) + synthetic(2, 5, rationale=True)
    keys, texts = ev.few_shot_prompts(train, train, 5, seed=20)  # every asked question is also a training row
    shared = max(set(keys), key=keys.count)
    for ex, key, text in zip(train, keys, texts):
        assert len(set(key)) == 5
        assert ex.question not in [train[i].question for i in key]
        # the official layout, spelled out: shot blocks and the asked prompt, separated by a blank line
        assert text == "\n\n".join([format_prompt(train[i]) + format_target(train[i]) for i in key]
                                   + [format_prompt(ex)])
        assert text.count(f"Q: {ex.question}\n") == 1
    # all questions but the shots themselves share one prefix; each shot gets its own
    assert sum(k != shared for k in keys) == 5
    assert {train[i].question for i in shared} == {ex.question for ex, k in zip(train, keys) if k != shared}
    # by content, not index: a copy of a shot's question (another object, other answer) gets other shots
    copy = Example(train[shared[0]].question, "A", ("x", "y"))
    assert shared[0] not in ev.few_shot_prompts([copy], train, 5, seed=20)[0][0]
    # fixed by the seed
    assert ev.few_shot_prompts(train, train, 5, seed=20) == (keys, texts)
    assert ev.few_shot_prompts(train, train, 5, seed=21)[0] != keys
    assert ev.few_shot_prompts(train[:3], train, 0, seed=20)[1] == [format_prompt(ex) for ex in train[:3]]
    with pytest.raises(ValueError, match="--shots 5"):
        ev.few_shot_prompts(train[:1], train[:5], 5, seed=20)


def test_few_shot_prompts_real_rows_never_show_the_question(shared_data):
    train = [convert("openbookqa", r) for r in read_jsonl(shared_data / "openbookqa" / "train.jsonl")[:400]]
    keys, texts = ev.few_shot_prompts(train, train, 5, seed=20)
    for ex, text in zip(train, texts):
        # a row's question may recur in another row; the prompt must show it exactly once, at the end
        assert text.count(f"Q: {ex.question}\n") == 1 and text.endswith(format_prompt(ex))
    assert len(set(keys)) <= 1 + 5


def test_common_prefix_len_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        seqs = [[rng.randrange(3) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))]
        best = 0  # the longest n leaving each seq a token of its own with all seqs agreeing on [:n]
        for n in range(min(map(len, seqs))):
            if all(s[:n] == seqs[0][:n] for s in seqs):
                best = n
        assert ev.common_prefix_len(seqs) == best


# -----------------------------------------------------------------------------
# decoding and loss against plain computations


def prompts_of(tok, n, seed):
    """Token ids of few-shot prompts over synthetic rows, and their shared prefix length."""
    train = synthetic(seed, 20)
    asked = synthetic(seed + 1, n) + synthetic(seed + 2, 2, rationale=True)
    _, texts = ev.few_shot_prompts(asked, train, 2, seed=20)
    ids = encode_prompts(tok, texts)
    return asked, ids, ev.common_prefix_len(ids)


def test_cached_batched_decode_equals_uncached_one_at_a_time(tiny, chartok):
    tok, _ = chartok
    _, ids, P = prompts_of(tok, 9, seed=3)
    assert P > 50 and len({len(i) for i in ids}) > 3  # a real shared prefix, and real left padding
    free = [reference_greedy(tiny, i, -1, tok, None, 12) for i in ids]
    # an eos token and a stop string that the model does produce, so every way to finish is exercised
    eos, stop = free[0][4], tok.decode(free[1][2:4])
    want = [reference_greedy(tiny, i, eos, tok, stop, 12) for i in ids]
    ends = {"eos" if g[-1] == eos else "stop" if stop in tok.decode(g) else "max" for g in want}
    assert ends == {"eos", "stop", "max"} and len({len(g) for g in want}) > 2
    base = ev.prefix_cache(tiny, ids[0][:P], max(map(len, ids)) + 12)  # computed once, copied into each batch
    for batch_size in (1, 4, 32):
        gens, tokens = ev.greedy_decode(tiny, tok, eos, base, [i[P:] for i in ids], max_new_tokens=12,
                                        batch_size=batch_size, stop=stop)
        assert gens == want
        if batch_size == 1:  # no padding: each question's own tokens and the generated ones
            assert tokens == sum(len(i) - P for i in ids) + sum(map(len, want))
    with pytest.raises(ValueError, match="slots"):
        ev.greedy_decode(tiny, tok, eos, base, [i[P:] for i in ids], max_new_tokens=13, batch_size=4)


def test_gold_loss_equals_teacher_forced_forward(tiny, chartok):
    tok, eos = chartok
    asked, ids, P = prompts_of(tok, 7, seed=5)
    targets = [tok.encode(format_target(ex), add_special_tokens=False).ids + [eos] for ex in asked]
    want = []
    with torch.no_grad():
        for i, t in zip(ids, targets):
            _, loss = tiny(torch.tensor([i + t]), torch.tensor([[-100] * (len(i) - 1) + t + [-100]]))
            want.append(loss.item() * len(t))
    base = ev.prefix_cache(tiny, ids[0][:P], max(len(i) + len(t) for i, t in zip(ids, targets)))
    for batch_size in (1, 3, 16):
        nll, _ = ev.gold_loss(tiny, base, [i[P:] for i in ids], targets, batch_size=batch_size)
        assert nll == pytest.approx(want, rel=1e-4)


def test_rank_split_sums_to_one_rank_and_loss_is_direct(tiny, chartok):
    tok, eos = chartok
    train = synthetic(7, 30)
    asked = train[:6] + synthetic(8, 8) + synthetic(9, 3, rationale=True)  # some asked rows are shots too
    kw = dict(shots=3, seed=20, batch_size=4, max_new_tokens=6)
    one = ev.evaluate_task(tiny, tok, eos, asked, train, **kw)
    parts = [ev.evaluate_task(tiny, tok, eos, asked, train, rank=r, world=3, **kw) for r in range(3)]
    for key in ("correct", "n", "target_tokens"):
        assert sum(p[key] for p in parts) == one[key]
    assert sum(p["nll"] for p in parts) == pytest.approx(one["nll"], rel=1e-5)
    assert [p["n"] for p in parts] == [6, 6, 5]
    # the loss, directly: each full prompt + gold target + EOS through the model, no cache, no padding
    _, texts = ev.few_shot_prompts(asked, train, 3, seed=20)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex, text in zip(asked, texts):
            p, t = tok.encode(text).ids, tok.encode(format_target(ex)).ids + [eos]
            _, loss = tiny(torch.tensor([p + t]), torch.tensor([[-100] * (len(p) - 1) + t + [-100]]))
            nll, count = nll + loss.item() * len(t), count + len(t)
    assert one["n"] == len(asked) and one["target_tokens"] == count
    assert one["nll"] == pytest.approx(nll, rel=1e-5)
    # the loss signal skips generation: same loss, fewer tokens
    cheap = ev.evaluate_task(tiny, tok, eos, asked, train, signal="loss", **kw)
    assert cheap["nll"] == pytest.approx(one["nll"], rel=1e-6) and cheap["tokens"] < one["tokens"]


# -----------------------------------------------------------------------------
# bad input


def test_evaluate_rejects_bad_arguments(tiny, chartok):
    tok, eos = chartok
    mixture = {"t": {"train": synthetic(1, 10), "selection": synthetic(2, 3)}}
    for kw, msg in ((dict(tasks=["nope"]), "unknown task 'nope'"), (dict(split="test"), "no 'test' examples"),
                    (dict(limit=0), "limit"), (dict(signal="f1"), "signal"), (dict(batch_size=0), "batch_size")):
        args = dict(tasks=["t"]) | kw
        with pytest.raises(ValueError, match=msg):
            ev.evaluate(tiny, tok, eos, mixture, **args)
    r = ev.evaluate(tiny, tok, eos, mixture, ["t"], limit=2, shots=2, max_new_tokens=3, signal="loss")["t"]
    assert r["n"] == 2 and r["acc"] is None and r["loss"] > 0 and r["tokens"] > 0


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    """A mixture folder made by data.py from rows in the plain schema."""
    import data
    src = tmp_path_factory.mktemp("src")
    (src / "toy").mkdir()
    rows = [{"question": ex.question, "answer": ex.answer, "choices": list(ex.choices)} for ex in synthetic(4, 30)]
    (src / "toy" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("mix")
    data.prepare(str(src), out, n_train=20, n_selection=5, n_test=5)
    return out


@pytest.mark.parametrize("flags, msg", [
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--shots", "-1"], "--shots must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--split", "dev"], "invalid choice: 'dev'"),
])
def test_cli_rejects_bad_flags(mixture_dir, monkeypatch, capsys, flags, msg):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", "unused", "--data", str(mixture_dir)] + flags)
    with pytest.raises(SystemExit) as e:
        ev.main()
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_cli_rejects_missing_data_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", "unused", "--data", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        ev.main()
    assert "--data" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the real checkpoint on real rows


def test_real_model_matches_generate_one_by_one(smollm2, shared_data):
    tok, eos = load_tokenizer(smollm2)
    model = Transformer.from_pretrained(smollm2).eval()
    rows = lambda split: [convert("arc_easy", r) for r in read_jsonl(shared_data / "arc_easy" / f"{split}.jsonl")]
    train, asked = rows("train")[:100], rows("test")[:6]
    _, texts = ev.few_shot_prompts(asked, train, 1, seed=20)
    ids = encode_prompts(tok, texts)
    P = ev.common_prefix_len(ids)
    base = ev.prefix_cache(model, ids[0][:P], max(map(len, ids)) + 7)
    gens, _ = ev.greedy_decode(model, tok, eos, base, [i[P:] for i in ids], max_new_tokens=7, batch_size=4)
    correct = 0
    for i, g, ex in zip(ids, gens, asked):
        # model.generate: plain cached greedy on one unpadded prompt, cut here at the first EOS or "\nQ:"
        full = model.generate(torch.tensor([i]), 7)[0, len(i):].tolist()
        cut = next((k + 1 for k in range(len(full)) if full[k] == eos or ev.STOP in tok.decode(full[:k + 1])),
                   len(full))
        assert g == full[:cut]
        correct += ev.is_correct(ev.extract_answer(tok.decode(g).split(ev.STOP)[0]), ex.answer)
    assert 0 < correct < len(asked)  # a real signal: some right, some wrong
    got = ev.evaluate_task(model, tok, eos, asked, train, shots=1, seed=20, batch_size=4, max_new_tokens=7)
    assert got["correct"] == correct and got["n"] == len(asked)
