#!/usr/bin/env bash
# Advance the real results by one time-boxed chunk on a GPU machine that starts empty, and bring them back as
# one archive for `rethink import ARCHIVE --store results`.
#
#   bench/gpu-results.sh [--device cpu] [--smoke] DATA_DIR OUT_DIR [MINUTES] [RESUME_ARCHIVE]
#
# DATA_DIR holds cifar-10-batches-py/. The chunk starts from the records already in results/ (finished runs
# are never trained again) and from RESUME_ARCHIVE when given (an earlier chunk's archive: its partial runs'
# checkpoints resume instead of starting over). It trains the next unfinished runs of `full`, packed, in an
# order that completes whole tables and figures first: Table 1's convolutional rows, Figure 1a, Figure 1b/c,
# Figure 2b, the regularizers. Every `rethink run` gets what is left of MINUTES (default 9) minus a margin
# for the export, so the chunk ends inside its allocation. OUT_DIR receives results-<UTC time>.tar.gz (the newly
# finished runs' records, plus the checkpoints of runs left partial while the archive stays under 16 MiB) and
# log.txt. --device cpu --smoke: a dry check of the whole path on a CPU with a tiny synthetic DATA_DIR.
# RETHINK_VERIFY_DATA=0 skips the md5 check of the data files (results still record their md5s).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
SIZING=()
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --smoke) SIZING=(--smoke); shift ;;
    *) echo "gpu-results.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
DATA_DIR="${1:?usage: bench/gpu-results.sh [--device cpu] [--smoke] DATA_DIR OUT_DIR [MINUTES] [RESUME_ARCHIVE]}"
OUT_DIR="${2:?usage: bench/gpu-results.sh [--device cpu] [--smoke] DATA_DIR OUT_DIR [MINUTES] [RESUME_ARCHIVE]}"
MINUTES="${3:-9}"
RESUME="${4:-}"
PACK="${RETHINK_PACK:-8}"
MARGIN=45  # seconds kept for the export at the end
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
if ! python -c "import numpy, torch" 2>/dev/null; then  # fail in a second, not after every command has failed
  echo "$(basename "$0"): $(command -v python || echo 'no python') cannot import torch and numpy: put the Python that holds torch first on PATH" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
: >"$LOG"
START=$(date +%s)
END=$((START + ${MINUTES%.*} * 60 - MARGIN))
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STORE="$WORK/store"
VERIFY=()
if [[ "${RETHINK_VERIFY_DATA:-1}" == 0 ]]; then VERIFY=(--no-verify-data); fi
say() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
rethink() { python -m rethink "$@"; }

say "chunk of $MINUTES min on $DEVICE, data $DATA_DIR; results/ has $(find results/runs -name result.json 2>/dev/null | wc -l) finished runs"
if [[ -d results/runs ]]; then
  rethink export --store results --out "$WORK/known.tar.gz" >>"$LOG" 2>&1 &&
    rethink import "$WORK/known.tar.gz" --store "$STORE" >>"$LOG" 2>&1 || { say "could not copy results/"; exit 1; }
fi
if [[ -n "$RESUME" ]]; then
  rethink import "$RESUME" --store "$STORE" --with-checkpoints 2>&1 | tee -a "$LOG" | head -n 1
fi

# Whole tables and figures first; each call resumes what the one before left partial.
STEPS=(
  "table1 --only-models inception,inception-nobn,alexnet"
  "fig1a"
  "fig1bc"
  "fig2b"
  "regularizers"
  "full"
)
for step in "${STEPS[@]}"; do
  left=$((END - $(date +%s)))
  if ((left < 20)); then
    say "budget spent before: $step"
    break
  fi
  say "rethink run --suite $step (${left}s left)"
  # shellcheck disable=SC2086  # $step holds the suite and its selection
  rethink run --suite $step "${SIZING[@]}" --data-dir "$DATA_DIR" "${VERIFY[@]}" --device "$DEVICE" \
    --store "$STORE" --pack "$PACK" --time-budget "${left}s" --no-aggregate >>"$LOG" 2>&1
  code=$?
  tail -n 1 "$LOG"
  if ((code != 0)); then say "rethink run --suite $step exited $code (failures are listed in $LOG)"; fi
done

ARCHIVE="$OUT_DIR/results-$(date -u +%Y%m%dT%H%M%SZ).tar.gz"
rethink export --suite full "${SIZING[@]}" --data-dir "$DATA_DIR" --store "$STORE" --exclude-store results \
  --partial-checkpoints --max-size 16M --out "$ARCHIVE" 2>&1 | tee -a "$LOG"
rethink status --suite full "${SIZING[@]}" --data-dir "$DATA_DIR" --store "$STORE" | tail -n 1 | tee -a "$LOG"
say "done: $ARCHIVE (rethink import $(basename "$ARCHIVE") --store results)"
