"""A hand-written decoder for Qwen2/2.5, Qwen3, OLMo 2 and Llama checkpoints, logit for logit with transformers.

    from model import Transformer
    model = Transformer.from_pretrained("Qwen/Qwen2.5-0.5B")           # or a local folder in hub layout
    logits = model(idx)                                                 # (B, T, vocab)
    losses = model(idx, targets)                                        # (B,) each row's summed loss where targets
    h = model(idx, hidden=True)                                         # (B, T, dim): apply model.lm_head where read
    hub.save_pretrained(model, "out/model")                             # loads in transformers unchanged

The architectures differ in a handful of named fields of `ModelConfig` (qkv bias, q/k norm per head or over all
heads, norms after instead of before a sublayer, tied embeddings, rope scaling); there is one code path.
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.utils.checkpoint import checkpoint

import common
from hub import resolve_checkpoint, safetensors_files

SUPPORTED = ("qwen2", "qwen3", "olmo2", "llama")


# -----------------------------------------------------------------------------
# config

@dataclass
class ModelConfig:
    model_type: str = "llama"       # one of SUPPORTED; only decides the names written back to config.json
    vocab_size: int = 32000
    dim: int = 512                  # hidden_size
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8             # < n_heads: grouped-query attention
    head_dim: int = 64              # may differ from dim // n_heads (Qwen3)
    hidden_dim: int = 1408          # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_seq_len: int = 4096         # max_position_embeddings
    qkv_bias: bool = False          # Qwen2: bias on q, k, v projections
    qk_norm: str = "none"           # "head": RMSNorm per head (Qwen3); "all": over all heads (OLMo 2)
    post_norm: bool = False         # OLMo 2: norm the sublayer's output instead of its input
    tie_embeddings: bool = False
    extra: dict = field(default_factory=dict)  # other config.json keys (token ids...), written back unchanged

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}")

        def positive(key, value, kind=int):
            # a string or a float where a size belongs would fail later, deep in torch, naming no file
            ok = type(value) is int or kind is float and type(value) is float and math.isfinite(value)
            if not ok or value <= 0:
                want = "a positive integer" if kind is int else "a positive finite number"
                raise ValueError(f"{source}: {key} must be {want}, got {value!r}")
            return value
        try:
            n_heads = positive("num_attention_heads", d["num_attention_heads"])
            dim = positive("hidden_size", d["hidden_size"])
            head_dim = positive("head_dim", d.get("head_dim") or dim // n_heads)
            # transformers 5 writes rope_parameters; older configs have rope_theta + rope_scaling
            rope = dict(d.get("rope_parameters") or {})
            theta = positive("rope_theta", rope.pop("rope_theta", d.get("rope_theta", 10000.0)), float)
            scaling = rope or d.get("rope_scaling")
            if scaling:
                scaling = dict(scaling)
                kind = scaling.setdefault("rope_type", scaling.pop("type", "default"))
                if kind == "default":
                    scaling = None
                elif kind not in ("linear", "llama3"):
                    raise ValueError(f"{source}: rope type {kind!r} is not supported: default, linear, llama3 are")
            for bad, what in ((d.get("hidden_act", "silu") != "silu", f"hidden_act {d.get('hidden_act')!r}"),
                              (d.get("use_sliding_window"), "use_sliding_window=true"),
                              (d.get("attention_bias") and mt != "qwen2" or d.get("mlp_bias"), "a bias on " + mt)):
                if bad:
                    raise ValueError(f"{source}: {what} is not supported")
            known = {"model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "num_key_value_heads", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "dtype",
                     "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "architectures",
                     "torch_dtype", "transformers_version"}
            return cls(
                model_type=mt, vocab_size=positive("vocab_size", d["vocab_size"]), dim=dim,
                n_layers=positive("num_hidden_layers", d["num_hidden_layers"]), n_heads=n_heads,
                n_kv_heads=positive("num_key_value_heads", d.get("num_key_value_heads") or n_heads),
                head_dim=head_dim, hidden_dim=positive("intermediate_size", d["intermediate_size"]),
                norm_eps=positive("rms_norm_eps", d.get("rms_norm_eps", 1e-6), float), rope_theta=float(theta),
                rope_scaling=scaling, max_seq_len=positive("max_position_embeddings",
                                                           d.get("max_position_embeddings", 4096)),
                qkv_bias=mt == "qwen2", qk_norm={"qwen3": "head", "olmo2": "all"}.get(mt, "none"),
                post_norm=mt == "olmo2", tie_embeddings=d.get("tie_word_embeddings", mt != "olmo2"),
                extra={k: v for k, v in d.items() if k not in known})
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 whatever the activation dtype, as the reference does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":
        # llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s.get("original_max_position_embeddings", cfg.max_seq_len)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # hub layout: the two halves of each head are the rotated pairs, so no q/k permutation is needed
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of the tokens seen so far, one buffer per layer, for incremental decoding.

    Slots fill left to right and `len` is shared by all rows; rows of different lengths are left-padded and their
    padding slots marked invalid, so no token attends to them."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.len = 0

    def repeat(self, n: int) -> "KVCache":
        """A batch-1 cache (a shared prompt prefix) copied into n rows."""
        assert self.valid.size(0) == 1, "repeat expects a batch-1 cache"
        new = object.__new__(KVCache)
        new.k = [k.repeat(n, 1, 1, 1) for k in self.k]
        new.v = [v.repeat(n, 1, 1, 1) for v in self.v]
        new.valid = self.valid.repeat(n, 1)
        new.len = self.len
        return new


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.dim, bias=False)
        norm_dims = {"none": None, "head": (cfg.head_dim, cfg.head_dim), "all": (q_dim, kv_dim)}[cfg.qk_norm]
        if norm_dims:
            self.q_norm = RMSNorm(norm_dims[0], cfg.norm_eps)
            self.k_norm = RMSNorm(norm_dims[1], cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if c.qk_norm == "all":  # OLMo 2 normalises the whole projection before splitting heads
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, c.n_heads, c.head_dim)
        k = k.view(B, T, c.n_kv_heads, c.head_dim)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if c.qk_norm == "head":  # Qwen3 normalises each head
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, n_heads, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, n_kv, T, hd)
        if cache is not None:
            s = cache.len
            cache.k[layer][:, :, s:s + T] = k
            cache.v[layer][:, :, s:s + T] = v
            k, v = cache.k[layer][:, :, :s + T], cache.v[layer][:, :, :s + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                           enable_gqa=c.n_kv_heads != c.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.checkpointing = False  # activation checkpointing: keep only the block's input, redo it in backward

    def forward(self, x, cos, sin, mask, cache, layer):
        if self.checkpointing and torch.is_grad_enabled():  # inside the block, so FSDP's hooks stay outside
            return checkpoint(self.sublayers, x, cos, sin, mask, cache, layer, use_reentrant=False)
        return self.sublayers(x, cos, sin, mask, cache, layer)

    def sublayers(self, x, cos, sin, mask, cache, layer):
        if self.post_norm:
            x = x + self.attn_norm(self.attn(x, cos, sin, mask, cache, layer))
            return x + self.mlp_norm(self.mlp(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.compiled = None  # compile_blocks(): torch.compile'd views of self.layers, for training
        # kept in fp32 (model.to(bfloat16) would cast it: use autocast for bf16, as train.py does)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if self.embed.weight.device.type != "meta":
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, cache: KVCache | None = None, pos=None, mask=None, docs=None, hidden=False):
        """idx (B, T) ids. cache: keys/values go to slots cache.len.. and cache.len advances by T. pos (B, T): rotary
        positions (default: the slot index). mask (B, T) bool: False marks padding no token may attend to. docs
        (B, T): the example of each token in rows packed with several (-1: padding); a token then attends only to
        its own example's earlier tokens (pos restarting at each). Returns logits (B, T, vocab); with targets
        (-100: none) each row's summed cross-entropy (B,), or with docs each example's (max(docs) + 1,).
        hidden=True: the final normed states (B, T, dim), for the caller to apply lm_head where it reads."""
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        freqs = pos[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        x = self.embed(idx)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        attn_mask = None
        if cache is not None or mask is not None:
            valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=idx.device)
            if cache is not None:
                cache.valid[:, start:start + T] = valid
                valid = cache.valid[:, :start + T]
            q_slot = torch.arange(start, start + T, device=idx.device)[:, None]
            k_slot = torch.arange(start + T, device=idx.device)[None, :]
            # causal and not padding; a token always sees itself, so padding rows never softmax over nothing
            attn_mask = ((k_slot <= q_slot) & valid[:, None, None, :]) | (k_slot == q_slot)  # (B, 1, T, S)
        elif docs is not None:  # block-diagonal and causal: each example sees only itself (a pad only pads)
            attn_mask = (docs[:, :, None] == docs[:, None, :]).tril()[:, None]  # (B, 1, T, T)
        # the compiled blocks serve fixed-shape passes (training, teacher forcing); decoding with a cache, whose
        # shapes change every step, runs the plain ones (STYLE rule 9)
        blocks = self.compiled if self.compiled is not None and cache is None else self.layers
        for i, block in enumerate(blocks):
            x = block(x, cos, sin, attn_mask, cache, i if cache is not None else None)
        if cache is not None:
            cache.len += T
        x = self.norm(x)
        if hidden:
            return x
        if targets is None:
            return self.lm_head(x).float()
        # training's loss: each row's summed cross-entropy over its targets (-100: none), in fp32, and the head's
        # matmul only where there is a target (the answer tokens): no (B, T, vocab) logits, most of them never read
        keep = targets != -100  # (B, T)
        ce = F.cross_entropy(self.lm_head(x[keep]).float(), targets[keep], reduction="none")  # (n,)
        owner = keep.nonzero()[:, 0] if docs is None else docs[keep]  # the row, or the example, of each target
        return torch.zeros(B if docs is None else int(docs.max()) + 1, device=ce.device).index_add(0, owner, ce)

    def compile_blocks(self):  # per block, as FSDP shards; the modules stay uncompiled, their state_dict keys too
        """torch.compile'd views of the blocks, for training's passes (forward picks them; decoding does not)."""
        self.compiled = [torch.compile(block) for block in self.layers]

    # -------------------------------------------------------------------------
    # hub checkpoints

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, prepare=None, fill=None):
        """Load a folder in hub layout (or a hub id, through huggingface_hub) straight into dtype (default fp32)
        on device: built on the meta device, then `prepare(model)` if given (fsdp.py shards it here), then every
        parameter allocated and filled tensor by tensor by `fill(param, tensor)` (default: a copy; fsdp.py takes
        its rank's rows), so the weights are held once."""
        folder = resolve_checkpoint(path)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected a checkpoint folder in hub layout)")
        cfg = ModelConfig.from_hf(common.read_json(cfg_path), str(cfg_path))
        files = safetensors_files(folder)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if prepare is not None:
            prepare(model)
        model.to_empty(device=device or "cpu")
        if dtype is not None:
            model.to(dtype)
        if cfg.tie_embeddings and model.lm_head.weight is not model.embed.weight:
            model.lm_head.weight = model.embed.weight  # to_empty allocates each module's parameters apart
        params = dict(model.named_parameters())  # a tied head is the embedding: one entry
        names = key_map(cfg)  # hub name -> ours
        filled = set()
        for f in files:
            try:
                st = safe_open(f, framework="pt")
            except SafetensorError as e:  # a cut-short copy or download: the file named, not just the reason
                raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
            with st:
                for name in st.keys():
                    if name not in names:
                        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_embeddings):
                            continue  # derived buffers; the tied head is the embedding
                        raise ValueError(f"{f}: unexpected tensor {name!r} for model_type {cfg.model_type!r}")
                    ours = names[name]
                    shape = tuple(st.get_slice(name).get_shape())
                    if shape != tuple(expected[ours]):
                        raise ValueError(f"{f}: tensor {name!r} has shape {shape}, config.json implies "
                                         f"{tuple(expected[ours])}")
                    t = st.get_tensor(name)
                    if not t.is_floating_point() or not torch.isfinite(t).all():  # a quantized or broken file
                        what = "holds NaN or inf" if t.is_floating_point() else f"is {t.dtype}, not float weights"
                        raise ValueError(f"{f}: tensor {name!r} {what}: not a checkpoint to train or evaluate")
                    with torch.no_grad():
                        (fill or torch.Tensor.copy_)(params[ours], t)
                    filled.add(ours)
        missing = sorted(h for h, o in names.items() if o not in filled)
        if missing:
            raise ValueError(f"{folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        model.inv_freq = rope_inv_freq(cfg).to(device)
        return model

def key_map(cfg: ModelConfig) -> dict[str, str]:
    """Every hub tensor name of this config -> our parameter name. The same names serve Qwen, OLMo and Llama;
    only where the two layer norms sit (before or after the sublayer) changes which hub norm is which."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    norms = (("post_attention_layernorm", "post_feedforward_layernorm") if cfg.post_norm
             else ("input_layernorm", "post_attention_layernorm"))
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        m[h + norms[0] + ".weight"] = o + "attn_norm.weight"
        m[h + norms[1] + ".weight"] = o + "mlp_norm.weight"
        for hub, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            m[f"{h}self_attn.{hub}.weight"] = f"{o}attn.{ours}.weight"
            if cfg.qkv_bias and hub != "o_proj":
                m[f"{h}self_attn.{hub}.bias"] = f"{o}attn.{ours}.bias"
        if cfg.qk_norm != "none":
            m[h + "self_attn.q_norm.weight"] = o + "attn.q_norm.weight"
            m[h + "self_attn.k_norm.weight"] = o + "attn.k_norm.weight"
        for hub, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            m[f"{h}mlp.{hub}.weight"] = f"{o}mlp.{ours}.weight"
    return m


