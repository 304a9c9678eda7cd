"""The demo end to end: data generation, training, evaluation on the held-out val split.

    python benchmarks/bench_demo.py [--out runs/bench_demo] [--minutes M] [--json FILE] [key=value ...]

Runs ``maskrcnn demo`` in a fresh run folder (an earlier one is deleted, dataset included, so
generation is timed too) and reports total and training time, iterations, box AP and mask AP
(AP, AP50) on the val split. The demo's aim: mask AP >= 0.5 with about 5 minutes of training
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from maskrcnn.train.demo import run_demo

KEYS = (
    "segm_AP",
    "segm_AP50",
    "segm_AP75",
    "bbox_AP",
    "bbox_AP50",
    "iterations",
    "epochs",
    "stopped",
    "data_seconds",
    "train_seconds",
    "eval_seconds",
    "total_seconds",
    "threads",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench_demo", help="run folder, deleted first (default: runs/bench_demo)")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default: the demo config's)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    code = run_demo(out, [*args.overrides, "progress=false"], minutes=args.minutes)
    wall = time.monotonic() - started
    if code != 0:
        print(f"demo failed with exit code {code}", file=sys.stderr)
        return code
    report = json.loads((out / "metrics.json").read_text())
    result = {
        "wall_seconds": round(wall, 1),
        **{k: report[k] for k in KEYS if k in report},
        "overrides": args.overrides,
        "minutes": args.minutes,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    print(
        f"demo: mask AP {result['segm_AP']:.3f} (AP50 {result['segm_AP50']:.3f}), box AP {result['bbox_AP']:.3f}; "
        f"training {result['train_seconds'] / 60:.1f} min, {result['iterations']} iterations; "
        f"total {wall / 60:.1f} min ({'meets' if result['segm_AP'] >= 0.5 else 'misses'} the 0.5 mask AP aim)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
