"""Pins flops.py by hand counts: the parameter count N of a small config written out here (and of transformers' own
models, and of the real SmolLM2 checkpoint's tensors), the per-token formula against torch's FLOP counter on our
model, FlopCounter's sums, and a real mSFT run whose FLOPs equal 6N x its logged training tokens + 2N x its
logged evaluation tokens, and Appendix F's per-stage count from the examples' own lengths."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import cut_mixture
import flops
from model import ModelConfig, Transformer

# vocab 100, hidden 16, 2 layers, 4 query heads and 2 kv heads of 4 dims, MLP 40 wide, untied
SMALL = ModelConfig(vocab_size=100, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, hidden_dim=40)


def test_param_count_by_hand():
    # per layer: q 16x16 = 256, k 16x8 = 128, v 128, o 256, gate/up/down 3x16x40 = 1920, two norms 2x16 = 32
    layer = 256 + 128 + 128 + 256 + 1920 + 32
    assert layer == 2720
    non_embedding = 2 * layer + 16  # + the final norm
    assert flops.param_count(SMALL) == {"total": non_embedding + 100 * 16 * 2, "non_embedding": non_embedding}
    assert flops.param_count(SMALL) == {"total": 8656, "non_embedding": 5456}
    tied = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True})
    assert flops.param_count(tied) == {"total": 5456 + 1600, "non_embedding": 5456}
    # Qwen2: + biases on q (16), k (8), v (8); Qwen3: + q/k norms of one head (4 + 4); OLMo 2: over all heads (16 + 8)
    for extra, fields in [(32, dict(qkv_bias=True)), (8, dict(qk_norm="head")), (24, dict(qk_norm="all"))]:
        cfg = ModelConfig(**{**SMALL.__dict__, **fields})
        assert flops.param_count(cfg) == {"total": 8656 + 2 * extra, "non_embedding": 5456 + 2 * extra}


def test_param_count_matches_our_model_and_transformers():
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    for cls, kw in [("LlamaConfig", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
                    ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True)),
                    ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
                    ("Olmo2Config", dict(num_key_value_heads=2, tie_word_embeddings=False))]:
        hf_cfg = getattr(transformers, cls)(**base, **kw)
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        cfg = ModelConfig.from_hf(hf_cfg.to_dict())
        n = flops.param_count(cfg)
        assert n["total"] == sum(p.numel() for p in hf.parameters()), cls  # parameters(): tied ones once
        assert n["total"] == sum(p.numel() for p in Transformer(cfg).parameters()), cls
        embeddings = hf.get_input_embeddings().weight.numel() * (1 if cfg.tie_embeddings else 2)
        assert n["non_embedding"] == n["total"] - embeddings, cls


def test_param_count_of_the_real_smollm2(smollm2):
    cfg = ModelConfig.from_hf(json.loads((smollm2 / "config.json").read_text()))
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert flops.param_count(cfg)["total"] == stored
    assert round(stored / 1e6) == 135  # SmolLM2-135M


def test_forward_flops_per_token_by_hand_and_by_torch():
    # matmuls per layer: q 256 + k 128 + v 128 + o 256 + MLP 1920 = 2688; x 2 layers + logits 100 x 16 = 6976;
    # attention per layer: 2 x 2 x context x (4 heads x 4 dims) = 64 context
    assert flops.forward_flops_per_token(SMALL, context=10) == 2 * 6976 + 2 * 64 * 10 == 15232
    # torch's counter on our model: the math attention kernel computes the whole T x T square, so context = T
    T = 12
    model = Transformer(SMALL).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 100, (1, T)))
    assert counter.get_total_flops() == T * flops.forward_flops_per_token(SMALL, context=T)


def test_flop_counter_sums_and_checks():
    c = flops.FlopCounter(1000)
    c.train(10)      # 6 x 1000 x 10 = 60,000
    c.forward(3.0)   # 2 x 1000 x 3 = 6,000 (an all-reduced count arrives as a float)
    c.lookahead(2)   # 8 x 1000 x 2 = 16,000
    c.eval(5)        # 2 x 1000 x 5 = 10,000
    c.add("test", 4)  # 2 x 1000 x 4 = 8,000: the final report, never in the total
    c.add("paper_eval", 7)  # 2 x 1000 x 7 = 14,000: the same evaluation as Appendix F counts it
    assert c.report() == {"train": 82_000, "eval": 10_000, "total": 92_000, "test": 8_000, "paper_eval": 14_000,
                          "paper_total": 96_000, "paper_test": 0, "forward": 6_000, "lookahead": 16_000}
    again = flops.FlopCounter(1000)
    again.load_state_dict(c.state_dict())
    assert again.report() == c.report()
    assert again.tokens == {"train": 10, "forward": 3, "lookahead": 2, "eval": 5, "test": 4, "paper_eval": 7,
                            "paper_test": 0}
    for bad in (-1, 1.5, math.nan, "7"):
        with pytest.raises(ValueError, match="train tokens must be a whole number >= 0"):
            c.train(bad)
    with pytest.raises(ValueError, match="n_params must be a positive integer"):
        flops.FlopCounter(0)
    with pytest.raises(ValueError, match="not the FLOP counter of a model with 999 parameters"):
        flops.FlopCounter(999).load_state_dict(c.state_dict())


@pytest.fixture(scope="module")
def mix(demo_data, tmp_path_factory):
    """The demo's tasks cut to 40 training, 8 selection and 8 test rows each, with the demo's model."""
    out = cut_mixture(demo_data, tmp_path_factory.mktemp("mix") / "mix", 40, 8, 8)
    return out, out / "model"


def test_a_real_msft_run_costs_what_its_log_and_appendix_f_say(tmp_path, mix):
    """A real mSFT run (the real evaluator, the loss signal, no shots): its compute FLOPs are 6 N x the training
    tokens plus 2 N x the tokens each logged evaluation ran; its paper FLOPs are Appendix F's, counted here from the
    log and from the examples' own lengths: every checkpoint evaluates the active tasks' prompts whole with their
    targets, and each stage's roll-back checkpoint the tasks excluded in earlier stages once (Appendix F's V(E_k): not
    the task this stage excludes, whose evaluations it counted as active); the test split's report is apart."""
    import train
    folder, model = mix
    n = sum(p.numel() for p in Transformer.from_pretrained(model).parameters())
    reported = {}
    for eval_excluded in ("every", "rollback"):
        args = train.parse_args(["--method", "msft", "--out", str(tmp_path / eval_excluded), "--budget", "0.5",
                                 "--interval", "0.25", "--max-stages", "5", "--signal", "loss", "--shots", "0",
                                 "--batch-size", "10", "--lr", "1e-2", "--eval-excluded", eval_excluded])
        final = train.train(args, model, folder)
        log = [json.loads(line) for line in (tmp_path / eval_excluded / "log.jsonl").read_text().splitlines()]
        reported[eval_excluded] = check_costs(final, log, n, folder, model)
    # the excluded tasks' scores change no decision: the same run, evaluated less, costs the same by Appendix F
    every, rollback = reported["every"], reported["rollback"]
    assert rollback["paper_eval"] == every["paper_eval"] and rollback["train"] == every["train"]
    assert rollback["eval"] < every["eval"]


def check_costs(final, log, n, folder, model):
    import data
    tok, eos = data.load_tokenizer(model)
    mixture = data.load_mixture(folder)
    length = {s: {t: sum(len(ids) for ids, _ in data.encode_examples(tok, eos, m[s], 512)) for t, m in mixture.items()}
              for s in ("selection", "test")}  # a prompt with its target and EOS, as the loss signal reads them
    evals = [e for e in log if e["event"] == "eval"]
    decisions = [e for e in log if e["event"] == "decision" and e["kind"] in ("drop", "no_drop")]
    assert any(d["kind"] == "drop" for d in decisions) and len(decisions) >= 2
    excluded, paper = [], 0
    for e in log:
        if e["event"] == "eval":
            assert e["paper_tokens"] == {t: length["selection"][t] for t in e["evaluated"]}
            paper += sum(length["selection"][t] for t in e["active"] if t in e["evaluated"])
        elif e in decisions:  # Appendix F's V(E_k): the tasks excluded before this stage, once, at its roll-back
            paper += sum(length["selection"][t] for t in excluded)
            excluded += e["excluded"]
    train_tokens = sum(e["tokens"] for e in log if e["event"] == "train")
    f = final["flops"]
    assert f["train"] == 6 * n * train_tokens
    assert f["eval"] == 2 * n * sum(e["eval_tokens"] for e in evals)
    assert f["paper_eval"] == 2 * n * paper and f["paper_total"] == f["train"] + f["paper_eval"]
    reports = 1 + (final["scores"] != final["final_scores"])  # the final model, and the best when another
    assert f["paper_test"] == 2 * n * reports * sum(length["test"].values())
    assert f["total"] == f["train"] + f["eval"]  # the test split is never in a total
    return f
