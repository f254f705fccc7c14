"""Pins evaluate.py: the release's answer rule (SPEC section 9) on hand-made edge cases, and that stopping once the
first "####" line has ended never changes an answer (strings, a scripted model, the real one); the Wilson interval
against its quadratic; prompts written out by hand, never showing the asked question (by content), fixed by the
seed; the first-token mismatch of the release's prompt measured on every real task; cached, batched, prefix-shared,
left-padded greedy decoding reading only the last position's logits, equal token for token to a plain full-logits
forward loop one sequence at a time; the gold-target loss from the target positions' logits equal to a direct
teacher-forced computation; Appendix F's token count restated; W simulated ranks, and two gloo processes, giving
what one gives; per-task figures (unparsed, most frequent answer, interval) and --out files; bad input rejected
with a message naming it, and, through the command, broken checkpoints, tokenizers and mixtures refused in one
line naming the file (a tokenizer larger than the vocabulary, a NaN loss naming its task); and, on real rows with the
real SmolLM2 checkpoint, decoding and accuracy equal to model.generate run one question at a time."""
import copy
import datetime
import json
import os
import random
import shutil
import socket
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models

import evaluate as ev
import evaluate_cli
import hub
import prepare
from conftest import generate
from data import Example, encode_prompts, from_plain, format_prompt, format_target, load_tokenizer, read_jsonl
from model import ModelConfig, Transformer
from prepare import convert

pytestmark = pytest.mark.usefixtures("one_thread")

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEQ0123456789 \n:#.,?"


# -----------------------------------------------------------------------------
# fixtures: a character tokenizer, a tiny random model, synthetic tasks


def make_chartok():
    """One token per character, plus <eos>: every string of CHARS round-trips exactly."""
    vocab = {c: i for i, c in enumerate(CHARS)} | {"<eos>": len(CHARS)}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.add_special_tokens(["<eos>"])
    tok.decoder = decoders.Fuse()
    return tok, vocab["<eos>"]


def make_tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(CHARS) + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # large weights: outputs depend on the question, and greedy choices are far from ties
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.4 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def chartok():
    return make_chartok()


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


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


def reference_greedy(model, ids, eos_id, tok, early_stop, max_new):
    """Greedy decoding the slow, obvious way: one sequence, the whole sequence through the model every step (all
    its logits), the whole text decoded after every token."""
    gen = []
    with torch.no_grad():
        while True:
            t = model(torch.tensor([ids + gen]))[0, -1].argmax().item()
            gen.append(t)
            if t == eos_id or len(gen) == max_new or early_stop and ev.answer_complete(tok.decode(gen)):
                return gen


# -----------------------------------------------------------------------------
# answers


@pytest.mark.parametrize("text, answer", [
    (" #### B\n\nQ:", "B"),
    (" she has 3 + 4 = 7 apples #### 7", "7"),
    ("  no marker here \n", "no marker here"),   # no "####": the whole output, stripped
    ("B.\nQ: next\nA: C", "B.\nQ: next\nA: C"),   # ... all of it, lines and periods too
    (" ####   \nthen text", ""),                  # nothing after the marker on its line
    (" #### 12 #### 13", "12 #### 13"),           # the first marker's line, whatever it holds
    (" first #### 5\nsecond #### 6", "5"),
    ("line one\nline two\n#### 42\n#### 43", "42"),
    ("####-3.5", "-3.5"),
    (" #### 7..", "7"),                           # trailing periods, all of them
    (" #### B. \nQ:", "B"),                       # stripped, then the period
    (" #### $1,000.\n", "$1,000"),
])
def test_extract_answer(text, answer):
    assert ev.extract_answer(text) == answer


@pytest.mark.parametrize("pred, gold, same", [
    ("18.", "18", True),                          # both parse as floats
    ("-7", "-7.0", True),
    ("-7", "7", False),
    ("0.5", ".5", True),
    ("0.5", "0.50001", False),
    ("3", "3.5", False),
    ("1e3", "1000", True),                        # Python's float reads both
    ("1,080", "1,080", True),                     # neither parses: the same string
    ("1080", "1,080", False),                     # one does not parse: strings differ
    ("$1,000", "1000", False),
    ("b", "B", True),                             # case
    ("Yes", "yes", True),
    ("true", "True", True),                       # boolq
    ("B", "C", False),
    ("1", "one", False),
    ("", "B", False),
])
def test_is_correct(pred, gold, same):
    assert ev.is_correct(pred, gold) is same


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="#\n .aB7", max_size=30), more=st.text(alphabet="#\n .aB7", max_size=30))
def test_answer_complete_means_more_text_changes_nothing(text, more):
    if ev.answer_complete(text):
        assert ev.extract_answer(text + more) == ev.extract_answer(text)
    else:  # and while it is not, some continuation does change the answer
        assert any(ev.extract_answer(text + c) != ev.extract_answer(text) for c in ("Z", "\n#### Z\n", "#### Z\n"))


def test_wilson_interval():
    assert ev.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook figures
    assert ev.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert ev.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    # restated: the ends are the p where (k/n - p)^2 = z^2 p (1 - p) / n, the roots of a quadratic
    for k, n in ((1, 3), (17, 40), (63, 100), (499, 500)):
        zz = 1.96 ** 2 / n
        roots = sorted(np.roots([1 + zz, -(2 * k / n + zz), (k / n) ** 2]).real)
        assert ev.wilson(k, n) == pytest.approx(roots, abs=1e-9)


# -----------------------------------------------------------------------------
# prompts


def test_prompts_written_out_by_hand():
    train = [Example("2 + 2?", "B", ("3", "4")),
             Example("Tom has 3 apples and buys 2. How many?", "5", None, "3 + 2 = 5.\n#### 5")]
    asked = Example("1 + 1?", "A", ("2", "3"))
    shown = {0: "Q: 2 + 2?\noptions: A. 3, B. 4\nA: #### B.\n",
             1: "Q: Tom has 3 apples and buys 2. How many?\nA: 3 + 2 = 5.\n#### 5\n"}
    keys, texts = ev.few_shot_prompts([asked], train, 2, seed=20)
    assert sorted(keys[0]) == [0, 1]
    assert texts == ["".join(shown[i] for i in keys[0]) + "Q: 1 + 1?\noptions: A. 2, B. 3\nA:"]
    assert ev.PROMPT_ENDS == {"release": " ", "consistent": ""}
    # given demonstrations, as written, in their order
    keys, texts = ev.few_shot_prompts([asked], train, 2, seed=20, demos=[("What?", "#### C."), ("Why?", "so\n#### D")])
    assert keys == [()]
    assert texts == ["Q: What?\nA: #### C.\nQ: Why?\nA: so\n#### D\nQ: 1 + 1?\noptions: A. 2, B. 3\nA:"]


def test_few_shot_prompts_seed_and_no_leak():
    train = synthetic(1, 40) + synthetic(2, 5, rationale=True)
    keys, texts = ev.few_shot_prompts(train, train, 5, seed=20)  # every asked question is also a training row
    shared = max(set(keys), key=keys.count)
    for ex, key, text in zip(train, keys, texts):
        assert len(set(key)) == 5
        assert ex.question not in [train[i].question for i in key]
        assert text.count(f"Q: {ex.question}\n") == 1 and text.endswith(format_prompt(ex))
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


def test_release_prompt_asks_for_a_first_token_training_never_wrote(shared_data, smollm2):
    """The measurement behind --prompt-end: per task, how often the first token of the trained answer (after "A:")
    differs from the first token the prompt asks the model to write (after "A: " for the release, "A:" otherwise)."""
    tok, _ = load_tokenizer(smollm2)
    first = lambda text: tok.encode(text, add_special_tokens=False).ids[0]
    for task_dir in sorted(p for p in shared_data.iterdir() if p.is_dir()):
        rows = read_jsonl(next(task_dir.glob("*.jsonl")))[:300]
        exs = [convert(task_dir.name, r) for r in rows]
        trained = [first(format_target(ex)) for ex in exs]
        # the asked prompt ends with whole tokens ("A:" then " " in the release's): the answer is tokenised apart
        assert all(tok.encode(format_prompt(ex) + " ").ids[:-1] == tok.encode(format_prompt(ex)).ids for ex in exs)
        release = sum(t != first(format_target(ex).removeprefix(" ")) for t, ex in zip(trained, exs)) / len(exs)
        consistent = sum(t != first(format_target(ex)) for t, ex in zip(trained, exs)) / len(exs)
        print(f"{task_dir.name}: first answer token differs from the trained one in {release:.1%} of {len(exs)} "
              f"rows with the release's prompt, {consistent:.1%} with the consistent one")
        assert consistent == 0 and release > 0.9


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
    ids = encode_prompts(tok, [t + " " for t in texts])
    return asked, ids, ev.common_prefix_len(ids)


def test_hidden_states_give_the_logits(tiny):
    idx = torch.randint(0, len(CHARS), (3, 9))
    with torch.no_grad():
        assert torch.equal(tiny.lm_head(tiny(idx, hidden=True)).float(), tiny(idx))


def test_cached_batched_decode_equals_uncached_one_at_a_time(tiny, chartok):
    tok, _ = chartok
    _, ids, P = prompts_of(tok, 9, seed=3)
    assert P > 50 and len({len(i) for i in ids}) > 3  # a real shared prefix, and real left padding
    free = [reference_greedy(tiny, i, -1, tok, False, 12) for i in ids]
    eos = free[0][4]  # an eos token the model does produce, so rows end at different steps and ways
    want = [reference_greedy(tiny, i, eos, tok, True, 12) for i in ids]
    assert {"eos" if g[-1] == eos else "max" for g in want} == {"eos", "max"} and len({len(g) for g in want}) > 2
    base = ev.prefix_cache(tiny, ids[0][:P], max(map(len, ids)) + 12)  # computed once, copied into each batch
    for batch_size in (1, 4, 32):
        gens, tokens = ev.greedy_decode(tiny, tok, eos, base, [i[P:] for i in ids], max_new_tokens=12,
                                        batch_size=batch_size)
        assert gens == want
        if batch_size == 1:  # no padding: each question's own tokens and the generated ones
            assert tokens == sum(len(i) - P for i in ids) + sum(map(len, want))
    with pytest.raises(ValueError, match="slots"):
        ev.greedy_decode(tiny, tok, eos, base, [i[P:] for i in ids], max_new_tokens=13, batch_size=4)


class PieceTok:
    """decode() over a list of text pieces; several ids may write the same text."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


# what each scripted row writes, and the piece its last one leads back to: answers that end at "\nQ:", after a
# line that held no marker, over a marker split across pieces, in one piece with its line end; none; EOS
SCRIPTS = [
    ([" so", " ####", " B", ".", "\nQ:", " x", " ####", " C", "\n"], 5),
    ([" think", "\n", "Q: y", "\nA:", " ####", " D", "\n", " z", "\n#### Z\n"], 7),
    (["##", "##", " 12 #", "### 13", "\n#### 9\n"], 4),
    ([" ####\n", " E"], 1),
    ([" no", " marker"], 0),
    ([" F", ""], None),
]


@pytest.fixture(scope="module")
def scripted():
    """A bigram model (no layers: the next token is a function of the last one) that writes SCRIPTS, after a
    question whose last token is its row's start; a PieceTok; the eos id; the rows' question suffixes."""
    pieces, nxt, starts = ["<q>"], {}, []
    for script, loop in SCRIPTS:
        first = len(pieces) + 1
        pieces += [f"<start{len(starts)}>"] + script
        starts.append(first - 1)
        for k in range(len(script) - 1):
            nxt[first + k] = first + k + 1
        nxt[first - 1] = first
        if loop is not None:
            nxt[first + len(script) - 1] = first + loop
    eos = len(pieces) - 1  # the last script ends with it
    V = len(pieces)
    model = Transformer(ModelConfig(vocab_size=V, dim=V, n_layers=0, n_heads=1, n_kv_heads=1, head_dim=2,
                                    hidden_dim=4)).eval()
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(V))
        model.lm_head.weight.zero_()
        for a, b in nxt.items():
            model.lm_head.weight[b, a] = 1.0
    suffixes = [[0] * r + [s] for r, s in enumerate(starts)]  # different lengths: left padding too
    return model, PieceTok(pieces), eos, suffixes


def test_early_stop_never_changes_an_answer(scripted):
    model, tok, eos, suffixes = scripted
    base = ev.prefix_cache(model, [0, 0, 0], 3 + 6 + 30)
    kw = dict(max_new_tokens=30, batch_size=4)
    full, _ = ev.greedy_decode(model, tok, eos, base, suffixes, early_stop=False, **kw)
    cut, _ = ev.greedy_decode(model, tok, eos, base, suffixes, **kw)
    answers = [ev.extract_answer(tok.decode(g)) for g in full]
    assert answers == ["B", "D", "12 #### 13", "", ("no marker " * 15).strip(), "F"]
    for f, c in zip(full, cut):
        # the old way: the whole text decoded after every token, stopping at the first where the answer's line ended
        k = next((k for k in range(1, len(f) + 1) if ev.answer_complete(tok.decode(f[:k]))), len(f))
        assert c == f[:k] and ev.extract_answer(tok.decode(c)) == ev.extract_answer(tok.decode(f))
    assert [len(c) for c in cut] == [5, 7, 5, 1, 30, 2] and len(full[0]) == 30
    # a "\nQ:" stop would have read " think" for the second row: the release reads on to "#### D"


def test_gold_loss_equals_teacher_forced_forward(tiny, chartok):
    tok, eos = chartok
    asked, ids, P = prompts_of(tok, 7, seed=5)
    targets = [tok.encode(format_target(ex), add_special_tokens=False).ids + [eos] for ex in asked]
    want = []
    with torch.no_grad():  # one unpadded row at a time through the model's own training loss
        for i, t in zip(ids, targets):
            want.append(tiny(torch.tensor([i + t]), torch.tensor([[-100] * (len(i) - 1) + t + [-100]])).item())
    base = ev.prefix_cache(tiny, ids[0][:P], max(len(i) + len(t) for i, t in zip(ids, targets)))
    for batch_size in (1, 3, 16):
        nll, _ = ev.gold_nll(tiny, base, [i[P:] for i in ids], targets, batch_size=batch_size)
        assert nll == pytest.approx(want, rel=1e-4)


def test_rank_split_sums_to_one_rank_and_loss_is_direct(tiny, chartok):
    tok, eos = chartok
    train = synthetic(7, 30)
    asked = train[:6] + synthetic(8, 8) + synthetic(9, 3, rationale=True)  # some asked rows are shots too
    kw = dict(shots=3, seed=20, batch_size=4, max_new_tokens=6, gold_loss=True)
    one = ev.evaluate_task(tiny, tok, eos, asked, train, **kw)
    parts = [ev.evaluate_task(tiny, tok, eos, asked, train, rank=r, world=3, **kw) for r in range(3)]
    for key in ("n", "target_tokens", "paper_tokens"):
        assert sum(p[key] for p in parts) == one[key]
    assert sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"]) == one["records"]
    assert sum(p["nll"] for p in parts) == pytest.approx(one["nll"], rel=1e-5)
    assert [p["n"] for p in parts] == [6, 6, 5]
    # directly, one question at a time with no cache and no padding: the loss of each training prompt ("...A:")
    # + gold target + EOS, and Appendix F's count: each asked prompt ("...A: ") whole + what it generates, each
    # gold-loss row whole
    _, texts = ev.few_shot_prompts(asked, train, 3, seed=20)
    nll, count, paper = 0.0, 0, 0
    with torch.no_grad():
        for ex, text in zip(asked, texts):
            p, t = tok.encode(text).ids, tok.encode(format_target(ex)).ids + [eos]
            loss = tiny(torch.tensor([p + t]), torch.tensor([[-100] * (len(p) - 1) + t + [-100]]))
            nll, count = nll + loss.item(), count + len(t)
            g = tok.encode(text + " ").ids
            paper += len(p) + len(t) + len(g) + len(reference_greedy(tiny, g, eos, tok, True, 6))
    assert one["n"] == len(asked) and one["target_tokens"] == count and one["paper_tokens"] == paper
    assert one["nll"] == pytest.approx(nll, rel=1e-5)
    # the accuracy signal without gold_loss skips that pass; the loss signal skips generation
    plain = ev.evaluate_task(tiny, tok, eos, asked, train, **(kw | dict(gold_loss=False)))
    cheap = ev.evaluate_task(tiny, tok, eos, asked, train, signal="loss", **kw)
    assert plain["records"] == one["records"] and plain["target_tokens"] == 0 and plain["tokens"] < one["tokens"]
    assert cheap["nll"] == pytest.approx(one["nll"], rel=1e-6) and cheap["records"] == []
    assert cheap["tokens"] < one["tokens"]


def test_evaluate_figures_of_a_model_that_always_says_the_same(tiny, chartok):
    tok, eos = chartok
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.norm.weight.zero_()  # every logit 0: greedy always picks token 0, "a"
    mixture = {"t": {"train": synthetic(1, 10), "selection": synthetic(2, 7) + [Example("x y?", "aaaa")]}}
    r = ev.evaluate(model, tok, eos, mixture, ["t"], shots=2, max_new_tokens=4, predictions=True)["t"]
    assert (r["n"], r["acc"], r["unparsed"], r["top_answer"], r["top_share"]) == (8, 1 / 8, 8, "aaaa", 1.0)
    assert r["acc_ci"] == ev.wilson(1, 8) and r["loss"] is None
    assert [p["index"] for p in r["predictions"]] == list(range(8))
    assert r["predictions"][7] == {"task": "t", "index": 7, "shots": r["predictions"][7]["shots"],
                                   "generated": "aaaa", "answer": "aaaa", "parsed": False, "gold": "aaaa",
                                   "correct": True}
    loss = ev.evaluate(model, tok, eos, mixture, ["t"], shots=2, signal="loss")["t"]
    assert loss["acc"] is None and loss["top_answer"] is None and loss["loss"] > 0
    # answers of one character from the random model: the most frequent one, counted from the predictions
    mixture = {"t": {"train": synthetic(1, 10), "selection": synthetic(3, 30)}}
    r = ev.evaluate(tiny, tok, eos, mixture, ["t"], shots=2, max_new_tokens=1, predictions=True)["t"]
    (top, count), (_, second) = Counter(p["answer"] for p in r["predictions"]).most_common(2)
    assert count > second and (r["top_answer"], r["top_share"]) == (top, count / 30)


def _two_ranks(rank, port, mixture, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank that skipped a collective fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    tok, eos = make_chartok()
    r = ev.evaluate(make_tiny(), tok, eos, mixture, sorted(mixture), shots=2, batch_size=3, max_new_tokens=5,
                    gold_loss=True, predictions=True)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(r, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_what_one_gives(tiny, chartok, tmp_path):
    tok, eos = chartok
    # task "u" has a single question: rank 1 has no share of it, yet reaches the collective
    mixture = {"t": {"train": synthetic(1, 10), "selection": synthetic(2, 7) + synthetic(3, 2, rationale=True)},
               "u": {"train": synthetic(4, 10), "selection": synthetic(5, 1)}}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, mixture, tmp_path / "r"), nprocs=2)
    one = json.loads(json.dumps(ev.evaluate(tiny, tok, eos, mixture, ["t", "u"], shots=2, batch_size=3,
                                            max_new_tokens=5, gold_loss=True, predictions=True)))
    for rank in (0, 1):
        two = json.loads((tmp_path / f"r.{rank}").read_text())
        for task in one:
            assert two[task]["loss"] == pytest.approx(one[task]["loss"], rel=1e-5)
            # every figure but the model's own work (each rank computes the shared prefix once)
            skip = ("loss", "tokens")
            assert {k: v for k, v in two[task].items() if k not in skip} == \
                   {k: v for k, v in one[task].items() if k not in skip}
            assert two[task]["tokens"] >= one[task]["tokens"]


# -----------------------------------------------------------------------------
# bad input, the command line


def test_evaluate_rejects_bad_arguments(tiny, chartok):
    tok, eos = chartok
    mixture = {"t": {"train": synthetic(1, 10), "selection": synthetic(2, 3)}}
    for kw, msg in ((dict(tasks=["nope"]), "unknown task 'nope'"), (dict(split="test"), "no 'test' examples"),
                    (dict(limit=0), "limit"), (dict(signal="f1"), "signal"), (dict(batch_size=0), "batch_size"),
                    (dict(prompt_end="A:"), "prompt_end"), (dict(demos={"u": [("q", "a")]}), "task 't'")):
        args = dict(tasks=["t"]) | kw
        with pytest.raises(ValueError, match=msg):
            ev.evaluate(tiny, tok, eos, mixture, **args)
    r = ev.evaluate(tiny, tok, eos, mixture, ["t"], limit=2, shots=2, max_new_tokens=3, signal="loss")["t"]
    assert r["n"] == 2 and r["acc"] is None and r["loss"] > 0 and r["tokens"] > 0


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    """A mixture folder made by data.py from rows in the plain schema."""
    src = tmp_path_factory.mktemp("src")
    (src / "toy").mkdir()
    rows = [{"question": ex.question, "answer": ex.answer, "choices": list(ex.choices)} for ex in synthetic(4, 30)]
    (src / "toy" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("mix")
    prepare.prepare(str(src), out, n_train=20, n_selection=5, n_test=5)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tiny, chartok, tmp_path_factory):
    """The tiny model and its tokenizer as a checkpoint folder."""
    out = tmp_path_factory.mktemp("tiny")
    model = copy.deepcopy(tiny)
    model.config.extra["eos_token_id"] = chartok[1]
    hub.save_pretrained(model, out)
    chartok[0].save(str(out / "tokenizer.json"))
    return out


def run_cli(monkeypatch, *flags):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *flags])
    evaluate_cli.main()


def test_cli_writes_results_and_predictions(tiny_dir, mixture_dir, tmp_path, monkeypatch, capsys):
    demos = tmp_path / "demos.json"
    demos.write_text(json.dumps({"toy": [{"question": "a b?", "answer": "#### A."}]}))
    out = tmp_path / "new" / "eval"  # created
    run_cli(monkeypatch, "--model", str(tiny_dir), "--data", str(mixture_dir), "--out", str(out), "--demos",
            str(demos), "--max-new-tokens", "4", "--prompt-end", "consistent", "--progress", "0.001")
    results = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert results["args"]["prompt_end"] == "consistent" and results["args"]["demos"] == str(demos)
    r = results["results"]["toy"]
    assert r["n"] == 5 == len(preds) and r["acc"] == sum(p["correct"] for p in preds) / 5
    assert [p["index"] for p in preds] == list(range(5)) and {p["task"] for p in preds} == {"toy"}
    assert all(p["shots"] == [] for p in preds)  # the file's demonstrations
    captured = capsys.readouterr()
    assert "toy: 5/5 questions" in captured.err and captured.out.splitlines()[1].startswith("toy")


@pytest.mark.parametrize("flags, msg", [
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--limit", "0"], "argument --limit: expected a finite int >= 1, got '0'"),
    (["--shots", "-1"], "argument --shots: expected a finite int >= 0, got '-1'"),
    (["--seed", "-1"], "argument --seed: expected a finite int >= 0, got '-1'"),
    (["--batch-size", "0"], "argument --batch-size: expected a finite int >= 1, got '0'"),
    (["--max-new-tokens", "1.5"], "argument --max-new-tokens: invalid int value: '1.5'"),
    (["--split", "dev"], "invalid choice: 'dev'"),
    (["--prompt-end", "A:"], "--prompt-end: invalid choice"),
    (["--progress", "0"], "argument --progress: expected a finite float > 0, got '0'"),
    (["--progress", "nan"], "argument --progress: expected a finite float > 0, got 'nan'"),
    (["--demos", "DIR/none.json"], "DIR/none.json: cannot read"),
    (["--demos", "DIR/demos.json"], "DIR/demos.json: toy[1]: expected {\"question\": text, \"answer\": text}"),
    (["--demos", "DIR/other.json"], "DIR/other.json: no list of demonstrations for task 'toy'"),
    (["--out", "DIR/demos.json"], "--out DIR/demos.json: not a writable folder"),
])
def test_cli_rejects_bad_flags(mixture_dir, tmp_path, monkeypatch, capsys, flags, msg):
    (tmp_path / "demos.json").write_text(json.dumps({"toy": [{"question": "q", "answer": "a"}, {"question": "q"}]}))
    (tmp_path / "other.json").write_text(json.dumps({"gsm8k": [{"question": "q", "answer": "a"}]}))
    flags = [f.replace("DIR", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as e:  # --model is never loaded: every check comes first
        run_cli(monkeypatch, "--model", "unused", "--data", str(mixture_dir), *flags)
    assert e.value.code == 2 and msg.replace("DIR", str(tmp_path)) in capsys.readouterr().err


def test_cli_rejects_missing_data_folder(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, "--model", "unused", "--data", str(tmp_path / "none"))
    assert "--data" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo(demo_data):
    """The demo mixture and its tiny model (data/model), as train.py makes them."""
    return demo_data


def edit_tensors(path, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_config(folder, **kw):
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **kw}))


BROKEN = {  # what breaks a copy of the demo model (m) or mixture (d) -> what the one line says
    "config not JSON": (lambda m, d: (m / "config.json").write_text('{"model_type": "llama",'),
                        "{m}/config.json: not valid JSON (Expecting property name"),
    "config value": (lambda m, d: edit_config(m, hidden_size="abc"),
                     "{m}/config.json: hidden_size must be a positive integer, got 'abc'"),
    "safetensors cut short": (lambda m, d: (m / "model.safetensors").write_bytes(
        (m / "model.safetensors").read_bytes()[:5000]), "{m}/model.safetensors: not a readable safetensors file ("),
    "no tokenizer.json": (lambda m, d: (m / "tokenizer.json").unlink(), "{m}/tokenizer.json: no such file"),
    "tokenizer.json corrupt": (lambda m, d: (m / "tokenizer.json").write_text('{"model": {'),
                               "{m}/tokenizer.json: not a readable tokenizer ("),
    "tokenizer_config.json not UTF-8": (lambda m, d: (m / "tokenizer_config.json").write_bytes(
        b'{"eos_token": "<|endoftext|>\xff"}'), "{m}/tokenizer_config.json: not valid UTF-8"),
    "tokenizer past the vocabulary": (lambda m, d: (edit_config(m, vocab_size=100), edit_tensors(
        m / "model.safetensors", lambda sd: sd.update({k: v[:100] for k, v in sd.items() if "embed" in k}))),
        "{m}: the tokenizer has 320 tokens but the model's vocabulary is 100"),
    "NaN weights": (lambda m, d: edit_tensors(m / "model.safetensors", lambda sd: sd["model.norm.weight"].fill_(
        float("nan"))), "{m}/model.safetensors: tensor 'model.norm.weight' holds NaN or inf"),
    "int8 weights": (lambda m, d: edit_tensors(m / "model.safetensors", lambda sd: sd.update(
        {k: v.to(torch.int8) for k, v in sd.items()})), "{m}/model.safetensors: tensor 'model.embed_tokens.weight' "
                                                         "is torch.int8, not float weights"),
    "another model's tokenizer": (lambda m, d: (edit_config(m, vocab_size=1000), edit_tensors(
        m / "model.safetensors", lambda sd: sd.update({k: v.repeat(4, 1)[:1000] for k, v in sd.items() if "embed" in k}))),
        "{m}: the tokenizer has 320 tokens, the model's vocabulary 1000: not this model's tokenizer"),
    "manifest not JSON": (lambda m, d: (d / "manifest.json").write_text("{"),
                          "--data {d}: {d}/manifest.json: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_cli_refuses_a_broken_checkpoint_or_mixture_naming_the_file(case, demo, tmp_path, refused):
    m, d = tmp_path / "m", tmp_path / "d"
    shutil.copytree(demo / "model", m)
    shutil.copytree(demo, d, ignore=shutil.ignore_patterns("model"))
    breaks, msg = BROKEN[case]
    breaks(m, d)
    line = refused("evaluate.py", "--model", m, "--data", d, "--tasks", "first", "--limit", 2, "--signal", "loss")
    assert msg.format(m=m, d=d) in line


# -----------------------------------------------------------------------------
# the real checkpoint on real rows


def test_real_model_matches_generate_one_by_one(smollm2, shared_data):
    tok, eos = load_tokenizer(smollm2)
    model = Transformer.from_pretrained(smollm2).eval()
    rows = lambda split: [convert("arc_easy", r) for r in read_jsonl(shared_data / "arc_easy" / f"{split}.jsonl")]
    train, asked = rows("train")[:100], rows("test")[:6]
    _, texts = ev.few_shot_prompts(asked, train, 1, seed=20)
    ids = encode_prompts(tok, texts)  # the consistent prompt: with one shot the release's rarely gets a "####"
    P = ev.common_prefix_len(ids)
    base = ev.prefix_cache(model, ids[0][:P], max(map(len, ids)) + 10)
    gens, _ = ev.greedy_decode(model, tok, eos, base, [i[P:] for i in ids], max_new_tokens=10, batch_size=4)
    correct = stopped = 0
    for i, g, ex in zip(ids, gens, asked):
        # model.generate: plain cached greedy on one unpadded prompt, all 10 tokens, cut here where ours stops
        full = generate(model, torch.tensor([i]), 10)[0, len(i):].tolist()
        cut = next((k + 1 for k in range(len(full))
                    if full[k] == eos or ev.answer_complete(tok.decode(full[:k + 1]))), len(full))
        assert g == full[:cut]
        stopped += len(g) < 10
        answer = ev.extract_answer(tok.decode(g))
        assert answer == ev.extract_answer(tok.decode(full[:full.index(eos) + 1] if eos in full else full))
        correct += ev.is_correct(answer, ex.answer)
    assert stopped >= 3 and 0 < correct < len(asked)  # early stops, and a real signal: some right, some wrong
    got = ev.evaluate_task(model, tok, eos, asked, train, shots=1, seed=20, prompt_end="consistent", batch_size=4,
                           max_new_tokens=10)
    assert sum(r["correct"] for r in got["records"]) == correct and got["n"] == len(asked)


def test_a_long_evaluation_shows_progress_inside_one_batch(demo, capsys):
    """A single batch can decode for minutes (gsm8k to 512 tokens): the progress line comes from the decoding steps,
    with the questions answered and the tokens generated so far, not only between batches."""
    model = Transformer.from_pretrained(demo / "model")
    tok, eos = load_tokenizer(demo / "model")
    mixture = {"first": {s: [from_plain(r) for r in read_jsonl(demo / "first" / f"{s}.jsonl")[:12]]
                         for s in ("train", "selection")}}
    ev.evaluate(model, tok, eos, mixture, ["first"], shots=0, batch_size=64, max_new_tokens=6, progress=1e-9)
    lines = [line for line in capsys.readouterr().err.splitlines() if "questions answered" in line]
    assert len(lines) >= 2  # several within the one batch of 12 questions
    assert lines[0].startswith("  first: ") and "tokens generated" in lines[0]
    generated = [int(line.split(", ")[1].split()[0]) for line in lines]
    assert generated == sorted(generated) and generated[0] == 12  # the first step: one token for each question
