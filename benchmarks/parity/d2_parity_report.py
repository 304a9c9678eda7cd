"""Measured agreement with the Detectron2 parity fixture, per family and case (the numbers the
README quotes). Runs our model only, against what Detectron2 recorded in tests/fixtures/d2_parity
(our environment with the dev extra, no Detectron2); from anywhere:

    python benchmarks/parity/d2_parity_report.py [r50 r101 x101]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "src"):  # the tests package (fixture runner, matching) and maskrcnn
    sys.path.insert(0, str(p))

from maskrcnn.ops.paste import paste_masks  # noqa: E402
from tests.model.parity import mask_iou, match_detections  # noqa: E402
from tests.model.test_parity_d2 import FAMILY_CASES, run_family  # noqa: E402


def main(families: list[str]) -> None:
    for family in families:
        for case, r in run_family(family, "cpu").items():
            for i in range(r["n"]):
                line = [f"{family} {case}[{i}]"]
                for stage in ("dets", "final"):
                    ref_boxes = torch.from_numpy(r["ref"][f"{stage}_boxes_{i}"])
                    ref_labels = torch.from_numpy(r["ref"][f"{stage}_labels_{i}"]) + 1
                    ours = r[stage][i]
                    fwd = match_detections(ours.boxes, ours.labels, ref_boxes, ref_labels)
                    m = fwd >= 0
                    box = np.abs(ours.boxes[fwd[m]].numpy() - ref_boxes[m].numpy()).max()
                    score = np.abs(ours.scores[fwd[m]].numpy() - r["ref"][f"{stage}_scores_{i}"][m]).max()
                    line.append(
                        f"{stage}: {m.sum()}/{len(m)} matched (ours {len(ours)}), box {box:.2g} px, score {score:.2g}"
                    )
                    if stage == "final":
                        ref_masks = mask_util.decode(r["masks_json"][i]).transpose(2, 0, 1).astype(bool)
                        pasted = paste_masks(
                            ours.masks, ours.boxes, ref_masks.shape[1:], threshold=0.5, mode="detectron2"
                        ).numpy()
                        ious = [mask_iou(ref_masks[j], pasted[k]) for j, k in enumerate(fwd) if k >= 0]
                        line.append(f"mask IoU min {min(ious):.4f}, {sum(v == 1.0 for v in ious)} identical")
                print("; ".join(line), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Measured agreement with the Detectron2 parity fixture, per family and case."
    )
    parser.add_argument(
        "families",
        nargs="*",
        metavar="FAMILY",
        help=f"fixture families to report, of {', '.join(sorted(FAMILY_CASES))} (default: all)",
    )
    args = parser.parse_args()
    unknown = [f for f in args.families if f not in FAMILY_CASES]
    if unknown:
        parser.error(
            f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; choose from {', '.join(sorted(FAMILY_CASES))}"
        )
    main(args.families or sorted(FAMILY_CASES))
