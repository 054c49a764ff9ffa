#!/usr/bin/env bash
# The benchmark matrix of docs/performance.md on one GPU, then a one-screen table. Under 8 minutes on an H100.
#
#   bench/gpu.sh                 # on the GPU machine
#   bench/gpu.sh --device cpu    # dry run of every command with tiny step counts (a few minutes on a CPU)
#
# Writes to $OUT when set, else ./bench-results/: bench.jsonl (one `rethink bench --json` record per line, with
# its name), summary.txt, pytest.txt (the GPU correctness tests), precision.json (the same runs trained in
# float32 and in bf16: final accuracies and epochs to each threshold), log.txt (each command's stderr).
# Installs nothing: it needs the repository and its virtual environment (.venv is activated when present).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="${2:?--device needs a value}"; fi
OUTDIR="${OUT:-./bench-results}"
BUDGET="${BENCH_BUDGET_S:-420}"  # no new measurement starts after this many seconds
mkdir -p "$OUTDIR"
rm -f "$OUTDIR/bench.jsonl"
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
if ! python -c "import numpy, torch" 2>/dev/null; then  # fail in a second, not after every command has failed
  echo "$(basename "$0"): $(command -v python || echo 'no python') cannot import torch and numpy: put the Python that holds torch first on PATH" >&2
  exit 2
fi
RECORDS="$(mktemp -d)"
: >"$OUTDIR/log.txt"
START=$(date +%s)

finish() {  # also on a timeout's signal: the records measured so far reach bench.jsonl and summary.txt
  python -m rethink.perf.bench collect "$RECORDS" "$OUTDIR/bench.jsonl" >>"$OUTDIR/log.txt"
  python -m rethink.perf.bench summarize "$OUTDIR/bench.jsonl" | tee "$OUTDIR/summary.txt"
  echo "done in $(elapsed)s; results in $OUTDIR"
  rm -rf "$RECORDS"
}
trap finish EXIT
trap 'echo "stopped by a signal after $(elapsed)s" | tee -a "$OUTDIR/log.txt"; exit 143' TERM INT

if [[ "$DEVICE" == cpu ]]; then
  PRECISION=(1 256)  # epochs, training images of the bf16-vs-fp32 check
  STEPS=(--steps 2 --warmup 1)
  EPOCHS=(--epochs 1 --train-images 512 --test-images 128)
  BIG_PACK=16
  COMPILE=()  # compiling the convolutional models takes minutes on a CPU: the dry run compiles only the MLPs
  LIMIT=600
  BUDGET="${BENCH_BUDGET_S:-1800}"
else
  PRECISION=(15 10000)
  STEPS=(--steps 100 --warmup 20)
  EPOCHS=(--epochs 2)  # 50k-image epochs of the real trainer after one warm-up epoch
  BIG_PACK=64
  COMPILE=(--compile)
  LIMIT=240
fi

elapsed() { echo $(($(date +%s) - START)); }

bench() {  # bench NAME ARGS...: one record, skipped once the time budget is spent
  local name=$1
  shift
  if (($(elapsed) > BUDGET)); then
    echo "skip $name: time budget of ${BUDGET}s spent" | tee -a "$OUTDIR/log.txt"
    return
  fi
  echo "[$(elapsed)s] $name: rethink bench $*" | tee -a "$OUTDIR/log.txt"
  if timeout "$LIMIT" python -m rethink bench --device "$DEVICE" --json "$@" >"$RECORDS/$name.json.part" \
    2>>"$OUTDIR/log.txt"; then
    mv "$RECORDS/$name.json.part" "$RECORDS/$name.json"
  else
    echo "FAILED $name (exit $?): see log.txt" | tee -a "$OUTDIR/log.txt"
  fi
}

if command -v nvidia-smi >/dev/null && [[ "$DEVICE" != cpu ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$OUTDIR/log.txt" 2>&1
fi

# 1. The targets first, in the precision runs use (float32, TF32 matrix units): Inception (s/epoch, x baseline),
# AlexNet (s/epoch), packed MLP (run-epochs/s).
bench inception-fp32-compile --model inception "${COMPILE[@]}" "${STEPS[@]}" "${EPOCHS[@]}" --baseline
if [[ "$DEVICE" != cpu ]]; then
  # The first H200 run (docs/performance.md) found the steps bound by launches: the trainer's epoch with CUDA graphs.
  bench inception-cudagraphs-epochs --model inception --compile --compile-mode reduce-overhead "${STEPS[@]}" "${EPOCHS[@]}"
fi
bench alexnet-fp32-compile --model alexnet "${COMPILE[@]}" "${STEPS[@]}" "${EPOCHS[@]}"
bench mlp1-pack$BIG_PACK --model mlp-1x512 --pack "$BIG_PACK" "${STEPS[@]}" "${EPOCHS[@]}"
bench mlp1-pack8 --model mlp-1x512 --pack 8 "${STEPS[@]}"

# 1b. bf16 against float32 on the same runs (docs/protocol.md: bf16 stays an explicit flag until this agrees).
if (($(elapsed) <= BUDGET)); then
  echo "[$(elapsed)s] bf16 vs fp32: ${PRECISION[0]} epochs on ${PRECISION[1]} synthetic images" | tee -a "$OUTDIR/log.txt"
  SYNTH="$RECORDS/synth"
  python -m rethink data synth --out "$SYNTH" --train "${PRECISION[1]}" --test 2000 >>"$OUTDIR/log.txt" 2>&1
  timeout "$LIMIT" python -m rethink.perf.bench precision "$SYNTH" "$DEVICE" "${PRECISION[@]}" "$OUTDIR/precision.json" \
    2>>"$OUTDIR/log.txt" | tee -a "$OUTDIR/log.txt"
fi

# 2. Correctness on the device: bf16 vs fp32 and compiled vs eager losses, packs vs unpacked twins.
if (($(elapsed) <= BUDGET)); then
  echo "[$(elapsed)s] pytest -m gpu" | tee -a "$OUTDIR/log.txt"
  timeout "$LIMIT" python -m pytest -q -m gpu -p no:cacheprovider tests/perf/test_bench.py tests/training/test_packed.py \
    >"$OUTDIR/pytest.txt" 2>&1
  echo "pytest -m gpu: exit $? ($(tail -n 1 "$OUTDIR/pytest.txt"))" | tee -a "$OUTDIR/log.txt"
fi

# 3. Every model in eager fp32 and in bf16 (+ channels_last for the convolutional ones).
for model in inception inception-nobn alexnet mlp-3x512 mlp-1x512; do
  bench "$model-fp32" --model "$model" "${STEPS[@]}"
  bench "$model-bf16" --model "$model" --amp "${STEPS[@]}"
done

# 4. The rest: compile where not measured yet, CUDA graphs, more packs.
bench mlp1-fp32-compile --model mlp-1x512 --compile "${STEPS[@]}"
bench mlp1-pack$BIG_PACK-compile --model mlp-1x512 --pack "$BIG_PACK" --compile "${STEPS[@]}"
bench mlp3-pack$BIG_PACK --model mlp-3x512 --pack "$BIG_PACK" "${STEPS[@]}"
bench mlp3-pack8 --model mlp-3x512 --pack 8 "${STEPS[@]}"
bench alexnet-pack8 --model alexnet --pack 8 "${STEPS[@]}"
bench inception-pack8 --model inception --pack 8 "${STEPS[@]}"
if [[ "$DEVICE" != cpu ]]; then
  bench alexnet-cudagraphs --model alexnet --compile --compile-mode reduce-overhead "${STEPS[@]}"
  bench inception-cudagraphs --model inception --compile --compile-mode reduce-overhead "${STEPS[@]}"
  bench nobn-fp32-compile --model inception-nobn --compile "${STEPS[@]}"
fi
bench mlp3-fp32-compile --model mlp-3x512 --compile "${STEPS[@]}"
