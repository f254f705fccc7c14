#!/usr/bin/env bash
# Builds the bf16 SmolLM2-135M-Instruct checkpoint on a machine with no network, from bench/smollm2_pack.sh's parts.
#
#     bash bench/smollm2_unpack.sh [DIR]    # default DIR: ~/.cache/msft-real/smollm2-135m-instruct; needs .gpu/part-a/
#                                           # and .gpu/part-b/ (carried by two calls); prints OK or exits 1
#
# Checks the parts' sha256, joins them into the Q4_1 GGUF, installs the gguf wheel into a temporary --target, converts
# the GGUF with transformers' GGUF loader exactly as ../shared/tools/get-smollm2.sh does (dequantized, saved in bf16
# with its tokenizer), then puts the development machine's tokenizer.json and tokenizer_config.json in place of the
# converted ones (transformers 5.17 converts the GGUF's vocabulary into another tokenizer.json than 5.23: byte
# fallback, another decoder, <|im_start|> as eos) and compares the result's tensors, shape and tokenizer.json with the
# fingerprint taken there (bench/checkpoint_hash.py). A DIR that already matches is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$HOME/.cache/msft-real/smollm2-135m-instruct}
python=${PYTHON:-python3}
fail() { echo "smollm2_unpack.sh: FAIL: $*" >&2; exit 1; }
[ -f .gpu/part-a/gguf.0 ] || fail ".gpu/part-a/gguf.0 is missing: carry .gpu/part-a (a machine given back between" \
                                  "the two calls loses it: carry it again)"
[ -f .gpu/part-b/gguf.1 ] || fail ".gpu/part-b/gguf.1 is missing: carry .gpu/part-b"
if [ -f "$out/model.safetensors" ] && "$python" bench/checkpoint_hash.py "$out" --expect .gpu/part-b/smollm2.json \
     2>/dev/null; then
  echo "$out"
  exit 0
fi
( cd .gpu && grep -v ' joined.gguf$' part-b/SHA256SUMS | sha256sum -c --quiet ) || fail "a part's sha256 differs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$out"
cat .gpu/part-a/gguf.0 .gpu/part-b/gguf.1 > "$work/src/SmolLM2-135M-Instruct.Q4_1.gguf"
[ "$(sha256sum < "$work/src/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)" = \
  "$(grep ' joined.gguf$' .gpu/part-b/SHA256SUMS | cut -d' ' -f1)" ] || fail "the joined GGUF's sha256 differs"
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" \
  .gpu/part-b/gguf-0.19.0-py3-none-any.whl
# from here to PY: get-smollm2.sh's converter, unchanged
PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$work/src" "$out" <<'PY' >&2
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
src, out = sys.argv[1], sys.argv[2]
f = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(src, gguf_file=f)
q = AutoModelForCausalLM.from_pretrained(src, gguf_file=f)
cfg = q.config.to_dict()
for k in ("quantization_config", "_model_name_or_path"):
    cfg.pop(k, None)
m = LlamaForCausalLM(LlamaConfig(**cfg))
m.load_state_dict(q.state_dict())
m.to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
ids = tok("The capital of Germany is Berlin. The capital of Italy is", return_tensors="pt").input_ids
print(repr(tok.decode(m.float().generate(ids, max_new_tokens=4, do_sample=False)[0])))
PY
cp .gpu/part-b/tokenizer/tokenizer.json .gpu/part-b/tokenizer/tokenizer_config.json "$out"/
"$python" bench/checkpoint_hash.py "$out" --expect .gpu/part-b/smollm2.json || fail "$out was converted but is not" \
  "the checkpoint measured on the development machine (see above); delete it or use it knowingly"
echo "$out"
