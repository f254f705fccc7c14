#!/usr/bin/env bash
# The paper's protocol on a real checkpoint, every method at once on one GPU, with the flags of the day (SPEC 9):
# SFT for 10 epochs, mSFT at C = 3 and C = 1, continual SFT (C = 3 and 1), IES, DynamixSFT, then SRO and Soft SRO
# on SFT's log; the tables, curves and the SFT curves' per-task peaks, packed into OUTDIR/protocol.tar.gz.
#
#     bash bench/protocol.sh OUTDIR                  # SmolLM2-135M-Instruct on the 7 tasks in MSFT_SHARED_DATA
#     bash bench/protocol.sh OUTDIR --deadline 540   # stop at 540 s; the same command resumes the unfinished runs
#     bash bench/protocol.sh OUTDIR --tiny           # the demo's model and mixture, a fraction of an epoch (CI)
#
# The mixture: up to 1,800 training, 200 selection and 500 test examples a task (data.py prepare, seed 20). The
# signal is --signal loss (minus the gold-answer loss on the selection split): on one GPU the accuracy signal's 5-shot
# generation at every quarter epoch of nine runs does not fit a session; evaluate.py scores the chosen models'
# accuracy afterwards (--acc-limit questions a task, 0: skip). Each run is its own train.py process writing to
# RUNS/<table>/<method> (RUNS: MSFT_PROTOCOL_RUNS, default ~/.cache/msft-protocol), its console in <method>.out;
# a finished run (summary.json) is skipped and a killed one resumed, so the command can be repeated until done.
# Inputs: MSFT_SMOLLM2, MSFT_SHARED_DATA (as bench/gpu.sh), PYTHON (default python3).
set -uo pipefail
out=${1:?usage: bench/protocol.sh OUTDIR [--tiny] [--deadline SECONDS] [--acc-limit N]}
shift
tiny=0 deadline=540 acc_limit=100
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) tiny=1 ;;
    --deadline) deadline=${2:?--deadline: expected seconds}; shift ;;
    --acc-limit) acc_limit=${2:?--acc-limit: expected a number of questions}; shift ;;
    *) echo "bench/protocol.sh: unknown argument $1 (expected --tiny, --deadline S, --acc-limit N)" >&2; exit 2 ;;
  esac
  shift
done
[[ $deadline =~ ^[0-9]+$ && $acc_limit =~ ^[0-9]+$ ]] || { echo "bench/protocol.sh: --deadline and --acc-limit take whole numbers" >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
runs=${MSFT_PROTOCOL_RUNS:-$HOME/.cache/msft-protocol}
mkdir -p "$runs" && runs=$(cd "$runs" && pwd)
log=$out/protocol.log
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*" | tee -a "$log"; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ "$tiny" = 1 ]; then  # the demo: its model, mixture and flags, a quarter epoch, the CPU
  "$python" -c "import demo; demo.demo_checkpoint(demo.make_demo('$runs/data'))" || exit 1
  model=$runs/data/model mix=$runs/data
  common=(--signal loss --device cpu --lr 5e-4 --batch-size 16 --max-len 64 --shots 0 --max-new-tokens 8
          --eval-limit 8 --interval 0.1 --max-epochs 0.2 --max-stages 2 --dynamix-every 2 --progress 0)
  budget3=(--budget 0.2) budget1=(--budget 0.1)
else
  model=${MSFT_SMOLLM2:-$HOME/.cache/msft-real/smollm2-135m-instruct}
  data=${MSFT_SHARED_DATA:-$([ -d .gpu/part-b/data ] && echo .gpu/part-b/data || echo ../shared/data)}
  mix=$runs/mix
  if [ ! -f "$mix/manifest.json" ]; then
    "$python" data.py prepare --source "$data" --out "$mix" --train 1800 --selection 200 --test 500 --seed 20 \
      --tasks arc_easy boolq commonsense_qa gsm8k hellaswag openbookqa sciq 2>&1 | tee -a "$log" || exit 1
  fi
  # no compile: nine processes share the GPU, and a 135M model's steps are bound by kernel launches more than FLOPs
  common=(--signal loss --no-compile --micro-batch 16 --eval-batch 64 --progress 60)
  budget3=(--budget 3) budget1=(--budget 1)
fi
say "protocol: model $model, mixture $mix, runs in $runs, deadline ${deadline} s"

# launch TABLE METHOD FLAGS...: one train.py in the background, skipped when finished, resumed when killed
pids=()
launch() {
  local dir=$runs/$1/$2
  shift 2
  mkdir -p "$(dirname "$dir")"
  if [ -f "$dir/summary.json" ]; then say "$dir: finished"; return; fi
  local resume=()
  [ -f "$dir/state/state.json" ] && resume=(--resume)
  say "$dir: ${resume[*]:-start} $*"
  "$python" train.py --model "$model" --data "$mix" --out "$dir" --keep-state "${common[@]}" "$@" "${resume[@]}" \
    >> "$dir.out" 2>&1 &
  pids+=($!)
}
left() { echo $((deadline - (SECONDS - start))); }
wait_until() {  # wait for the pids, or stop them at the deadline (they resume next time)
  while kill -0 "${pids[@]}" 2>/dev/null && [ "$(left)" -gt 0 ]; do sleep 2; done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  wait 2>/dev/null
  pids=()
}

launch main sft --method sft
launch main msft --method msft "${budget3[@]}"
launch main continual --method continual "${budget3[@]}"
launch main ies --method ies
launch main dynamix --method dynamix
launch c1 msft --method msft "${budget1[@]}"
launch c1 continual --method continual "${budget1[@]}"
# SRO and Soft SRO take SFT's log as their search phase: they start once it is finished
while [ ! -f "$runs/main/sft/summary.json" ] && kill -0 "${pids[0]:-0}" 2>/dev/null && [ "$(left)" -gt 0 ]; do
  sleep 2
done
if [ -f "$runs/main/sft/summary.json" ]; then
  launch main sro --method sro --search-log "$runs/main/sft/log.jsonl"
  launch main soft-sro --method soft-sro --search-log "$runs/main/sft/log.jsonl"
fi
wait_until
[ -e "$runs/c1/sft" ] || ln -s ../main/sft "$runs/c1/sft"  # the C = 1 table's SFT row, for its ratios

# the chosen models' accuracy on the test split, 5-shot, while time is left
if [ "$acc_limit" -gt 0 ] && [ "$tiny" != 1 ]; then
  for summary in "$runs"/main/*/summary.json "$runs"/c1/msft/summary.json "$runs"/c1/continual/summary.json; do
    [ -f "$summary" ] || continue
    dir=$(dirname "$summary")
    [ -f "$dir/accuracy.json" ] && continue
    "$python" evaluate.py --model "$dir/model" --data "$mix" --split test --limit "$acc_limit" --device cuda \
      --dtype bfloat16 --out "$dir/accuracy" >> "$dir.out" 2>&1 && cp "$dir/accuracy/results.json" "$dir/accuracy.json" &
    pids+=($!)
  done
  wait_until
fi

# the tables, the plots, the SFT curves' peaks, and one archive of everything but the weights
for table in main c1; do
  [ -d "$runs/$table" ] && "$python" compare.py --report "$runs/$table" >> "$log" 2>&1
done
"$python" - "$runs" >> "$log" 2>&1 <<'PY'
import json, sys
from pathlib import Path
import msft
runs = Path(sys.argv[1])
for table in ("main", "c1"):
    for d in sorted((runs / table).iterdir()) if (runs / table).is_dir() else []:
        if (d / "summary.json").is_file() and not d.is_symlink():
            s = json.loads((d / "summary.json").read_text())
            acc = json.loads((d / "accuracy.json").read_text()) if (d / "accuracy.json").is_file() else None
            print(f"{table}/{d.name}: chosen epoch {s['best_epoch']}, test avg {s['test_avg']:.4f}, total FLOPs "
                  f"{s['flops']['total']:.3e}, wall {s['wall_time_s']:.0f} s"
                  + (f", test accuracy {acc}" if acc else ""))
sft = runs / "main" / "sft" / "log.jsonl"
if sft.is_file():
    evals = [e for e in map(json.loads, sft.read_text().splitlines()) if e["event"] == "eval"]
    peaks = {t: evals[i]["epoch"] for t, i in msft.peaks([e["scores"] for e in evals]).items()}
    print("SFT per-task peak epochs (selection score, rounded to 4 decimals):", json.dumps(peaks))
PY
tar -czf "$out/protocol.tar.gz" -C "$runs" --exclude='*/model' --exclude='*/final-model' --exclude='*/state' \
  --exclude='*/snapshots' --exclude='*/lock' --exclude='mix' --exclude='data' --exclude='*/accuracy' . 2>> "$log"
say "done: $(ls "$runs"/*/*/summary.json 2>/dev/null | wc -l) runs finished; $out/protocol.tar.gz"
