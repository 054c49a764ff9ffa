#!/usr/bin/env bash
# Re-render every report in results/ from the run records alone (no data, no training): the exact commands.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
agg() { python -m rethink aggregate --store results "$@" >/dev/null; echo "rendered results/reports/$2/ ($*)"; }
agg --suite quickstart
agg --suite table1 --seeds 3
agg --suite fig1bc --seeds 3
agg --suite fig2b
agg --suite regularizers
agg --suite full
python results/readme.py
python results/precision.py
