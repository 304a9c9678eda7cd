"""How far an INT8 export's detections move from its float32 export's, image by image.

    python benchmarks/bench_int8_agreement.py FP32.onnx INT8.onnx IMAGE [IMAGE ...]

For each image: detection counts, how many float32 detections have an INT8 one of the same label
at box IoU >= 0.5, and the median box and mask IoU of the best matches. (For accuracy on
labelled data, run ``maskrcnn evaluate`` on both files.)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from pycocotools import mask as mask_util

import maskrcnn
from maskrcnn.data.images import load_rgb
from maskrcnn.ops.boxes import box_iou


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32")
    p.add_argument("int8")
    p.add_argument("images", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    fp32, int8 = (maskrcnn.OnnxModel(f, threads=args.threads) for f in (args.fp32, args.int8))
    for path in args.images:
        image = load_rgb(path)
        ref, got = fp32.predict(image, keep_images=False), int8.predict(image, keep_images=False)
        if not len(ref) or not len(got):
            print(f"{path}: fp32 {len(ref)}, int8 {len(got)} detections")
            continue
        iou = box_iou(torch.from_numpy(ref.boxes), torch.from_numpy(got.boxes))  # (N_fp32, N_int8)
        iou[torch.from_numpy(ref.labels)[:, None] != torch.from_numpy(got.labels)[None, :]] = 0
        best, j = iou.max(1)
        masks = [
            float(mask_util.iou([got.rles[k]], [ref.rles[i]], [0])[0, 0])
            for i, k in enumerate(j.tolist())
            if best[i] >= 0.5
        ]
        print(
            f"{path}: fp32 {len(ref)}, int8 {len(got)} detections; matched (same label, box IoU >= 0.5) "
            f"{int((best >= 0.5).sum())}/{len(ref)}; median best box IoU {best.median():.3f}, "
            f"median mask IoU of the matched {np.median(masks) if masks else float('nan'):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
