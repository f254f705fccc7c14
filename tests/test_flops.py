"""Pins flops.py by hand counts: the parameter count N of a small config written out here (and of transformers' own
models, and of the real SmolLM2 checkpoint's tensors), the per-token formula against torch's FLOP counter on our
model, FlopCounter's 6ND / 2ND / 8ND sums, and an mSFT run whose counted FLOPs equal Appendix F's per-stage sum."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flops
import msft
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
    assert c.report() == {"train": 82_000, "eval": 10_000, "total": 92_000, "test": 8_000}
    again = flops.FlopCounter(1000)
    again.load_state_dict(c.state_dict())
    assert again.report() == c.report()
    assert again.tokens == {"train": 10, "forward": 3, "lookahead": 2, "eval": 5, "test": 4}
    for bad in (-1, 1.5, math.nan, "7"):
        with pytest.raises(ValueError, match="train tokens must be a whole number >= 0"):
            c.train(bad)
    with pytest.raises(ValueError, match="n_params must be a positive integer"):
        flops.FlopCounter(0)
    with pytest.raises(ValueError, match="not the FLOP counter of a model with 999 parameters"):
        flops.FlopCounter(999).load_state_dict(c.state_dict())


def test_msft_run_costs_appendix_f():
    """Appendix F's mSFT sum, stage by stage: 6N C D_train(active) + 2N (C / interval) D_val(active)
    + 2N D_val(excluded), plus the base model's evaluation; excluded tasks evaluated once per stage ("rollback")."""
    train_tokens = {"a": 100, "b": 300}  # per epoch of each task
    val_tokens = {"a": 10, "b": 20}      # per evaluation of each task
    counter = flops.FlopCounter(7)
    own = {"a": 0.0, "b": 0.0}

    class Hooks:  # a peaks after 0.5 epochs; b keeps improving
        at = [None, 0.0]  # the segment trained and the epoch it reached

        def train(self, active, origin, until):
            if self.at[0] != (active, origin):
                self.at = [(active, origin), origin]
            epochs, self.at[1] = until - self.at[1], until
            counter.train(sum(epochs * train_tokens[t] for t in active))
            for t in active:
                own[t] += epochs

        def evaluate(self, which):
            counter.eval(sum(val_tokens[t] for t in which))
            return {t: -(own[t] - 0.5) ** 2 if t == "a" else own[t] for t in which}

        def snapshot(self):
            return {"own": torch.tensor([own["a"], own["b"]])}

        def restore(self, params):
            own["a"], own["b"] = params["own"].tolist()
            self.at = [None, 0.0]

        def log(self, event):
            pass

        def checkpoint(self, state):
            pass

    state = msft.run_msft(["a", "b"], Hooks(), budget=1.0, interval=0.25, max_epochs=2.0,
                          store=msft.SnapshotStore(), eval_excluded="rollback")
    assert state.excluded == ["a"] and state.epoch == 2.0
    # stage 1 (0 -> 1, a and b; a dropped, back to 0.5); stage 2 (0.5 -> 1.5, b; then a once); stage 3 (1.5 -> 2.0,
    # cut by max_epochs: b, 2 evaluations; then a once)
    train = 1.0 * 400 + 1.0 * 300 + 0.5 * 300
    evals = 30 + 4 * 30 + (4 * 20 + 10) + (2 * 20 + 10)
    assert counter.report() == {"train": 6 * 7 * train, "eval": 2 * 7 * evals, "total": 6 * 7 * train + 2 * 7 * evals,
                                "test": 0}
