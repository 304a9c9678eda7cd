#!/usr/bin/env bash
# Kudzu mask AP with and without augmentation at the same time budget (docs/small-datasets.md).
# Both runs start side by side so that they share the machine's load; MINUTES (default 6) each.
# Usage: benchmarks/kudzu_augment.sh [MINUTES] [extra key=value for both runs ...]
set -euo pipefail
minutes=${1:-6}
shift || true
common=(solver.max_minutes="$minutes" pretrain.epochs=0 threads=1 progress=false "$@")
augment=(augment.vflip=0.5 augment.rot90=0.5 'augment.scale=[0.8,1.25]' augment.crop=576
         augment.brightness=0.2 augment.contrast=0.2 augment.saturation=0.2)
maskrcnn train kudzu out_dir=runs/kudzu_plain "${common[@]}" > runs/kudzu_plain.log 2>&1 &
maskrcnn train kudzu out_dir=runs/kudzu_aug "${common[@]}" "${augment[@]}" > runs/kudzu_aug.log 2>&1 &
wait
for run in plain aug; do
    echo "$run: $(tail -n 1 runs/kudzu_$run.log)"
    python - "$run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"runs/kudzu_{sys.argv[1]}/metrics.jsonl") if '"segm_AP"' in l]
print(f"  iterations {rows[-1]['iter']}, val_loss {rows[-1]['val_loss']:.3f}, bbox AP {rows[-1]['bbox_AP']:.3f}, "
      f"mask AP {max(r['segm_AP'] for r in rows):.3f} (best)")
PY
done
