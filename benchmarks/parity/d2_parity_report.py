"""Measured agreement with the Detectron2 parity fixture, per family and case (the numbers the
README quotes). Run from the repo root: ``PYTHONPATH=src:. python benchmarks/parity/d2_parity_report.py [r50 r101 x101]``."""
from __future__ import annotations

import sys

import numpy as np
import torch
from pycocotools import mask as mask_util

from maskrcnn.ops.paste import paste_masks
from tests.model.parity import mask_iou, match_detections
from tests.model.test_parity_d2 import FAMILY_CASES, run_family


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
                    line.append(f"{stage}: {m.sum()}/{len(m)} matched (ours {len(ours)}), box {box:.2g} px, score {score:.2g}")
                    if stage == "final":
                        ref_masks = mask_util.decode(r["masks_json"][i]).transpose(2, 0, 1).astype(bool)
                        pasted = paste_masks(ours.masks, ours.boxes, ref_masks.shape[1:], threshold=0.5, mode="detectron2").numpy()
                        ious = [mask_iou(ref_masks[j], pasted[k]) for j, k in enumerate(fwd) if k >= 0]
                        line.append(f"mask IoU min {min(ious):.4f}, {sum(v == 1.0 for v in ious)} identical")
                print("; ".join(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(FAMILY_CASES))
