#!/usr/bin/env bash
# Kudzu mask AP with and without augmentation at the same time budget (docs/small-datasets.md).
# The two runs go one after the other with all of the machine's threads: side by side at one
# thread each, an iteration took 5.3 to 6.1 s against 1.7 s alone at two threads (2-core Zen 4),
# so each run got a third of the iterations. Keep the machine otherwise idle: the budget is time.
# Usage: benchmarks/kudzu_augment.sh [MINUTES] [extra key=value for both runs ...]   (MINUTES: 25)
set -euo pipefail
minutes=${1:-25}
shift || true
common=(solver.max_minutes="$minutes" progress=false "$@")
augment=(augment.vflip=0.5 augment.rot90=0.5 'augment.scale=[0.8,1.25]' augment.crop=576
         augment.brightness=0.2 augment.contrast=0.2 augment.saturation=0.2)
mkdir -p runs
for run in plain aug; do
    extra=()
    [[ $run == aug ]] && extra=("${augment[@]}")
    echo "$run: start $(date +%T), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    maskrcnn train kudzu out_dir=runs/kudzu_$run "${common[@]}" "${extra[@]}" > runs/kudzu_$run.log 2>&1
    echo "$run: end $(date +%T), load average $(cut -d' ' -f1-3 /proc/loadavg)"
done
for run in plain aug; do
    python - "$run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"runs/kudzu_{sys.argv[1]}/metrics.jsonl") if '"segm_AP"' in l]
best = max(rows, key=lambda r: r["segm_AP"])
print(f"{sys.argv[1]}: {rows[-1]['iter']} iterations; best mask AP {best['segm_AP']:.3f} (iteration {best['iter']}, "
      f"box AP {best['bbox_AP']:.3f}); last mask AP {rows[-1]['segm_AP']:.3f}")
PY
done
