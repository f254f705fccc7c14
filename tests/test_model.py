"""model.py against transformers: logits of tiny random Qwen2/Qwen3/OLMo 2/Llama models (GQA, tied and untied
embeddings, qkv bias, head_dim != hidden/heads, rope scaling), the KV cache and padding, the save/load round trip,
hub ids through the offline cache, errors on bad checkpoints (a config.json that is not JSON, not UTF-8 or holds a
wrong-typed size, a safetensors file cut short or with a garbage header: each named), and greedy decoding of the real
SmolLM2 checkpoint."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import hub
from conftest import generate
from model import KVCache, ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            rms_norm_eps=1e-6, max_position_embeddings=256)
CONFIGS = {
    "llama-gqa-untied-llama3-rope": ("LlamaConfig", dict(
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama-mha-tied-linear-rope": ("LlamaConfig", dict(
        num_key_value_heads=4, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-qkv-bias-gqa-tied": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                    rope_theta=1000000.0)),
    "qwen3-head-dim-qk-norm-untied": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24,
                                                          tie_word_embeddings=False)),
    "olmo2-post-norm-gqa": ("Olmo2Config", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                rope_theta=500000.0)),
}


def hf_model(name):
    cls, kw = CONFIGS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**BASE, **kw)
    m = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases too, so every weight matters
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
    return m


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    hf = hf_model(request.param)
    hf.save_pretrained(tmp_path / "hf")
    return hf, Transformer.from_pretrained(tmp_path / "hf").eval(), tmp_path


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert got.shape == (3, 40, 97)
    assert (got - ref).abs().max().item() < 1e-4


def test_the_loss_is_each_rows_sum_over_its_targets_only(pair):
    """model(idx, targets): each row's summed cross-entropy where targets != -100, the head run only there, equal
    to the full logits' log-softmax read at those positions; a row with no target loses 0, and the gradient is the
    full computation's."""
    _, ours, _ = pair
    idx = torch.randint(0, 97, (3, 12))
    targets = idx.roll(-1, 1).clone()
    targets[:, :5] = -100
    targets[2] = -100  # a row with nothing to learn (a rank's empty stand-in)
    losses = ours(idx, targets)
    logp = ours(idx).log_softmax(-1)
    keep = targets != -100
    expected = [-logp[b][keep[b]].gather(-1, targets[b][keep[b]][:, None]).sum() for b in range(3)]
    torch.testing.assert_close(losses, torch.stack(expected), rtol=0, atol=1e-5)
    assert losses[2].item() == 0
    (g1,) = torch.autograd.grad(losses.sum(), ours.norm.weight)
    (g2,) = torch.autograd.grad(torch.stack(expected).sum(), ours.norm.weight)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_incremental_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = ours(idx)
        cache = KVCache(ours.config, 2, 32)
        parts = [ours(idx[:, :7], cache=cache)] + [ours(idx[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert cache.len == 20
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-4


def test_left_padding_with_shared_prefix_equals_unpadded(pair):
    """[prefix][pads][row] with positions continuing from the prefix gives each row's unpadded logits."""
    _, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 97, (1, 9), generator=g)
    rows = [torch.randint(0, 97, (n,), generator=g) for n in (5, 2, 4)]
    T = max(len(r) for r in rows)
    with torch.no_grad():
        cache = KVCache(ours.config, 1, 9 + T + 1)
        ours(prefix, cache=cache)
        cache = cache.repeat(3)
        idx = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.bool)
        pos = torch.zeros(3, T, dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, T - len(r):], mask[b, T - len(r):] = r, True
            pos[b, T - len(r):] = torch.arange(9, 9 + len(r))
        got = ours(idx, cache=cache, pos=pos, mask=mask)
        nxt = got[:, -1].argmax(-1, keepdim=True)
        step = ours(nxt, cache=cache, pos=torch.tensor([[9 + len(r)] for r in rows]))
        for b, r in enumerate(rows):
            ref = ours(torch.cat([prefix[0], r, nxt[b]])[None])
            assert (got[b, T - len(r):] - ref[0, 9:9 + len(r)]).abs().max().item() < 1e-4
            assert (step[b, 0] - ref[0, -1]).abs().max().item() < 1e-4


def test_save_pretrained_round_trip_in_transformers(pair):
    hf, ours, tmp = pair
    hub.save_pretrained(ours, tmp / "ours", max_shard_bytes=20_000)  # forces several shards
    assert (tmp / "ours" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ours").float().eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max().item() < 1e-4
    again = Transformer.from_pretrained(tmp / "ours")
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_into_dtype_without_a_second_copy(tmp_path):
    hf = hf_model("qwen2-qkv-bias-gqa-tied")
    hf.save_pretrained(tmp_path)
    m = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.lm_head.weight is m.embed.weight
    assert m.inv_freq.dtype == torch.float32


def test_hub_id_through_offline_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network here)."""
    hf = hf_model("llama-mha-tied-linear-rope")
    snap = tmp_path / "hub" / "models--tiny--llama" / "snapshots" / ("0" * 40)
    hf.save_pretrained(snap)
    (tmp_path / "hub" / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    m = Transformer.from_pretrained("tiny/llama")
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert (m(idx) - hf(idx).logits).abs().max().item() < 1e-4


# -----------------------------------------------------------------------------
# bad checkpoints

@pytest.fixture
def ckpt(tmp_path):
    hf_model("olmo2-post-norm-gqa").save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def edit_config(folder, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_model_type_lists_supported(ckpt):
    edit_config(ckpt, model_type="gpt2")
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: qwen2, qwen3, olmo2, llama"):
        Transformer.from_pretrained(ckpt)


def test_missing_tensor_is_named(ckpt):
    edit_tensors(ckpt, lambda sd: sd.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_norm.weight'\]"):
        Transformer.from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    edit_tensors(ckpt, lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        Transformer.from_pretrained(ckpt)


def test_misshaped_tensor_is_named(ckpt):
    edit_tensors(ckpt, lambda sd: sd.update({"model.norm.weight": torch.ones(47)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(47,\), config.json implies \(48,\)"):
        Transformer.from_pretrained(ckpt)


def test_config_contradicting_tensors(ckpt):
    edit_config(ckpt, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight' has shape \(48, 80\), config.json implies \(48, 96\)"):
        Transformer.from_pretrained(ckpt)


def test_pickle_only_folder_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\); refusing"):
        Transformer.from_pretrained(ckpt)


def test_bad_config_json_is_named_with_what_was_expected(ckpt):
    path = ckpt / "config.json"
    good = json.loads(path.read_text())
    for cfg, msg in (({**good, "hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
                     ({**good, "hidden_size": 48.0}, "hidden_size must be a positive integer, got 48.0"),
                     ({**good, "num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
                     ({**good, "num_hidden_layers": -2}, "num_hidden_layers must be a positive integer, got -2"),
                     ({**good, "num_attention_heads": True}, "num_attention_heads must be a positive integer, "
                                                             "got True"),
                     ({**good, "rms_norm_eps": "1e-6"}, "rms_norm_eps must be a positive finite number, got '1e-6'"),
                     ({k: v for k, v in good.items() if k != "vocab_size"}, "missing key 'vocab_size'")):
        path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=re.escape(f"{path}: {msg}")):
            Transformer.from_pretrained(ckpt)
    for raw, msg in ((b'{"model_type": "olmo2",', "not valid JSON (Expecting property name enclosed in double quotes"),
                     (b'{"model_type": "olmo\xff"}', "not valid UTF-8 (invalid start byte at byte 20)"),
                     (b'["olmo2"]', "expected a JSON object, got list")):
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(f"{path}: {msg}")):
            Transformer.from_pretrained(ckpt)


def test_corrupt_safetensors_is_named(ckpt):
    path = ckpt / "model.safetensors"
    good = path.read_bytes()
    # cut short (a copy or download that stopped), a garbage header, empty
    for raw in (good[:len(good) // 2], good[:8] + b"#" * 40 + good[48:], b""):
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable safetensors file (")):
            Transformer.from_pretrained(ckpt)


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_save_replaces_an_existing_folder_whole(tmp_path):
    m = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                hidden_dim=64, tie_embeddings=True))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.safetensors").write_text("x")
    hub.save_pretrained(m, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left beside it


# -----------------------------------------------------------------------------
# the real checkpoint

def test_smollm2_greedy_decoding_matches_transformers(smollm2):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # decode all 32 tokens, through EOS, as ours does
    ours = Transformer.from_pretrained(smollm2).eval()
    for prompt in ["The capital of Germany is Berlin. The capital of Italy is",
                   "Q: What is 12 plus 30?\nA:",
                   "def fibonacci(n):"]:
        idx = tok(prompt, return_tensors="pt").input_ids
        ref = hf.generate(idx, max_new_tokens=32, do_sample=False)
        got = generate(ours, idx, 32)
        assert got.tolist() == ref.tolist(), (tok.decode(got[0]), tok.decode(ref[0]))
