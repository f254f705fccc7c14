"""bench/memory.py's table rests on block_activation_bytes: checked here byte for byte against what autograd saves
for a block's backward pass (torch.autograd.graph.saved_tensors_hooks), in bf16 and under bf16 autocast over fp32
weights, and its state bytes against a hand count; the table prints every model and marks what fits 80 GB."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

CFG = ModelConfig(model_type="qwen2", vocab_size=500, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32,
                  hidden_dim=352, qkv_bias=True, tie_embeddings=True)


@pytest.mark.parametrize("autocast", [False, True])
def test_block_activation_bytes_are_what_autograd_saves(autocast):
    T = 256
    model = Transformer(CFG).to(torch.float32 if autocast else torch.bfloat16)
    x = torch.randn(1, T, CFG.dim, dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    freqs = torch.arange(T)[None, :, None].float() * model.inv_freq
    emb = torch.cat((freqs, freqs), -1)[:, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):  # each storage once: views of one tensor cost nothing more
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model.layers[0](x, cos, sin, None, None, None)
    # autocast also keeps bf16 copies of the weight matrices: the table counts those as compute copies
    q, kv = CFG.n_heads * CFG.head_dim, CFG.n_kv_heads * CFG.head_dim
    weight_copies = 2 * (CFG.dim * (q + 2 * kv) + q * CFG.dim + 3 * CFG.dim * CFG.hidden_dim) if autocast else 0
    assert sum(saved.values()) == memory.block_activation_bytes(CFG, T, 4 if autocast else 2) + weight_copies


def test_state_bytes_and_the_table():
    cfg = memory.MODELS["Qwen2.5 7B"]
    n = 7_615_616_512  # Qwen2.5-7B's parameter count
    ddp = memory.estimate(cfg, 8, False, "fp32", False)
    fsdp = memory.estimate(cfg, 8, True, "fp32", True)
    assert ddp["weights"] + ddp["gradients"] + ddp["optimizer"] == 16 * n  # why 7B does not fit on 80 GB under DDP
    assert fsdp["weights"] + fsdp["gradients"] + fsdp["optimizer"] == 2 * n
    assert ddp["total"] > 80e9 > fsdp["total"]
    assert memory.estimate(cfg, 8, True, "bf16", True)["optimizer"] == 4 * n / 8
    table = memory.table()
    assert table.count("\n") == 1 + 6 * 7 * 4  # 6 models x (DDP at 1, 4, 8, 16 + FSDP at 4, 8, 16) x 2 x 2
    assert "| Qwen3 8B | 8.19B | 8 | FSDP | fp32 | yes |" in table
