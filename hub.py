"""Checkpoint folders in hub layout: a hub id resolved through the cache, the safetensors files found (pickles
refused), and a model written back so that transformers and vLLM load it.

    folder = hub.resolve_checkpoint("Qwen/Qwen2.5-0.5B")       # or a local folder, as it is
    hub.save_pretrained(model, "runs/msft/model", copy=[folder / "tokenizer.json"])
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import common

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                 "llama": "LlamaForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def resolve_checkpoint(path) -> Path:
    """A local folder as it is; otherwise a hub id fetched (config, weights, tokenizer only) through the cache,
    honouring HF_HUB_OFFLINE."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/")):
        raise FileNotFoundError(f"{path}: not a checkpoint folder, nor a hub id like 'Qwen/Qwen2.5-0.5B'")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = common.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index}: lists {f.name}, which is not in {folder}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise ValueError(f"{folder}: only pickle weights ({', '.join(pickles)}); refusing to unpickle. Convert them "
                         "to safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def config_to_hf(cfg, dtype: torch.dtype | None = None) -> dict:
    """model.ModelConfig -> the config.json transformers reads."""
    d = dict(cfg.extra)
    d.update(architectures=[ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
             vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
             intermediate_size=cfg.hidden_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
             rope_scaling=cfg.rope_scaling, max_position_embeddings=cfg.max_seq_len,
             tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
    if cfg.model_type == "qwen3":
        d.setdefault("attention_bias", False)
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


def save_pretrained(model, out: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, dtype=None, tensors=None,
                    copy=()):
    """Write config.json + safetensors (sharded past max_shard_bytes) that transformers loads unchanged, and the
    files in `copy` (a tokenizer). tensors: (our name, tensor) pairs to write instead of this model's own (fsdp.py
    gathers a sharded model's one at a time); each shard file is written as soon as it is full, so at most one is
    held. The folder is written under a temporary name and swapped in whole (common.atomic)."""
    from model import key_map  # model.py imports this module: key_map is read when saving
    hub = {o: h for h, o in key_map(model.config).items()}
    if tensors is None:
        tensors = ((k, v) for k, v in model.state_dict().items())
    with common.atomic(out) as tmp:
        tmp.mkdir(parents=True)
        shard, size, files, weight_map, total, first = {}, 0, [], {}, 0, None

        def flush():
            files.append(tmp / f"part-{len(files)}.safetensors")
            save_file(shard, files[-1], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1].name))
        for k, v in tensors:
            if k not in hub:
                continue  # the tied head
            t = v.detach().to("cpu", dtype or v.dtype).contiguous()
            first = first or t.dtype
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[hub[k]], size, total = t, size + nbytes, total + nbytes
        flush()
        if len(files) == 1:
            os.replace(files[0], tmp / "model.safetensors")
        else:  # the hub's names, now that the count is known
            final = {f.name: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
            for f in files:
                os.replace(f, tmp / final[f.name])
            index = {"metadata": {"total_size": total}, "weight_map": {k: final[f] for k, f in weight_map.items()}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config, first), indent=2))
        for f in copy:
            shutil.copy(f, tmp / Path(f).name)
