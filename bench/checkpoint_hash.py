"""A fingerprint of a hub-layout checkpoint that does not depend on how its files were written, to check a copy.

    python bench/checkpoint_hash.py DIR > expected.json             # on the machine that has the checkpoint
    python bench/checkpoint_hash.py DIR --expect expected.json      # elsewhere: prints OK, or names what differs

The fingerprint: a sha256 per tensor (its name, dtype, shape and bytes) and one over all of them in name order, the
model's shape as model.py reads config.json, and the sha256 of tokenizer.json. Safetensors headers, shard layout and
config.json keys that model.py ignores (transformers_version, ...) may differ.
Used by bench/smollm2_pack.sh (here) and bench/smollm2_unpack.sh (on the GPU machine).
"""
import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py sits one folder up
from model import ModelConfig, safetensors_files  # noqa: E402


def fingerprint(folder: Path) -> dict:
    tensors = {}
    for f in safetensors_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, whatever the dtype
                tensors[name] = h.hexdigest()
    total = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(tensors.items())).encode()).hexdigest()
    cfg = dataclasses.asdict(ModelConfig.from_hf(json.loads((folder / "config.json").read_text())))
    cfg.pop("extra")  # token ids and the like: what transformers writes there varies by version
    tok = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    return {"tensors_sha256": total, "config": cfg, "tokenizer_sha256": tok, "tensors": dict(sorted(tensors.items()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="checkpoint folder: config.json, *.safetensors, tokenizer.json")
    ap.add_argument("--expect", type=Path, help="a fingerprint written by this script: compare instead of printing")
    args = ap.parse_args()
    if not (args.folder / "config.json").is_file() or not (args.folder / "tokenizer.json").is_file():
        ap.error(f"folder {args.folder}: expected config.json and tokenizer.json in it")
    got = fingerprint(args.folder)
    if args.expect is None:
        print(json.dumps(got, indent=1))
        return
    want = json.loads(args.expect.read_text())
    problems = [f"{k} differs: {got[k]} here, {want[k]} expected" for k in ("config", "tokenizer_sha256")
                if got[k] != want[k]]
    for name in sorted(set(got["tensors"]) | set(want["tensors"])):
        if got["tensors"].get(name) != want["tensors"].get(name):
            what = "missing here" if name not in got["tensors"] else "unexpected" if name not in want["tensors"] \
                else "other bytes"
            problems.append(f"tensor {name}: {what}")
    if problems or got["tensors_sha256"] != want["tensors_sha256"]:
        print(f"FAIL: {args.folder} is not the checkpoint {args.expect} describes:", file=sys.stderr)
        for p in problems[:20]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
        sys.exit(1)
    print(f"OK: {args.folder} matches {args.expect} ({len(got['tensors'])} tensors, sha256 "
          f"{got['tensors_sha256'][:16]}..., same config and tokenizer.json)")


if __name__ == "__main__":
    main()
