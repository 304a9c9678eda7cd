"""Write the per-level proposal fixtures: which FPN level each of the reference's proposals came
from, for one photo per family whose padded height / 32 is odd (an 800-px side: P6 has 13 rows,
and 800 // 13 = 61 is not Detectron2's stride 64), chosen among candidates for the most P6
proposals.

The weights are the committed parity recipes with the FPN levels balanced: the output convs of
P3..P5 scaled so that every level has P2's RMS on the recipe's calibration photo
(``balance_fpn_levels`` of the generators; unbalanced, no P6 proposal reaches the top 1000). The
factors go to ``scales.json``; ``tests/helpers.py::level_checkpoint`` applies them to the
recipe's file. Runs in the reference environment:

    PYTHONPATH=/work/d2src /work/venv-ref/bin/python benchmarks/parity/make_level_fixture.py [FAMILY ...] [--pick]

For each family (tv1, tv2, r50, r101, x101) it then runs the reference's preprocessing, backbone and RPN
on the photo and writes ``levels_FAMILY.npz`` into tests/fixtures/levels: ``proposals_0`` (the
reference's proposals, resized frame, its order), ``levels_0`` (0..4 = P2..P6), ``batch_shape``,
and ``image`` (the photo's name under ../shared/data/kudzu_bug/images). ``--pick`` first counts
P6 proposals on every candidate photo and takes the one with the most.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
import sweep
import torch

OUT = sweep.REPO / "tests" / "fixtures" / "levels"
CANDIDATES = ["train_2.jpg", "train_5.jpg", "train_8.jpg", "val_25.jpg"]
FIXTURES = {  # family -> (recipe folder, file suffix, the recipe's calibration photo)
    "tv1": (sweep.SHARED / "fixtures" / "tv_parity", ".pth", "train_10.jpg"),
    "tv2": (sweep.REPO / "tests" / "fixtures" / "tv2_parity", ".pth", "train_10.jpg"),
    "r50": (sweep.REPO / "tests" / "fixtures" / "d2_parity" / "r50", ".pkl", "train_1.jpg"),
    "r101": (sweep.REPO / "tests" / "fixtures" / "d2_parity" / "r101", ".pkl", "train_1.jpg"),
    "x101": (sweep.REPO / "tests" / "fixtures" / "d2_parity" / "x101", ".pkl", "train_1.jpg"),
}


def fixture_checkpoint(family: str, tmp: Path) -> Path:
    folder, suffix, _ = FIXTURES[family]
    path = tmp / f"{family}{suffix}"
    if family in sweep.d2gen.FAMILIES:
        sweep.d2gen.load_rule().write_checkpoint(str(path), folder)
    else:
        sweep.tvgen.load_rule(folder).write_checkpoint(str(path), folder)
    return path


def balanced(family: str, model, cfg, path: Path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Scale the FPN levels of ``model`` (in place) and return the factors by the file's key names."""
    photo = sweep.PHOTOS / FIXTURES[family][2]
    if cfg is not None:
        scales = sweep.d2gen.balance_fpn_levels(model, sweep.d2gen.predictor_input(photo, cfg))
        keys = set(pickle.loads(path.read_bytes())["model"])
    else:
        scales = sweep.tvgen.balance_fpn_levels(model, sweep.tvgen.read_image(photo))
        keys = set(torch.load(path, weights_only=True))
    out = {}
    for name, f in scales.items():
        model.get_parameter(name).data.mul_(f)
        key = (
            name if name in keys else name.replace(".0.weight", ".weight").replace(".0.bias", ".bias")
        )  # v1's 2019 names
        assert key in keys, name
        out[key] = f
    return out


@torch.no_grad()
def reference_proposals(family: str, model, cfg, photo: Path, capture: sweep.LevelCapture) -> dict:  # type: ignore[no-untyped-def]
    if cfg is not None:
        batch = model.preprocess_image([sweep.d2gen.predictor_input(photo, cfg)])
        proposals, _ = model.proposal_generator(batch, model.backbone(batch.tensor), None)
        props, shape = proposals[0].proposal_boxes.tensor.numpy().copy(), batch.tensor.shape
    else:
        batch, _ = model.transform([sweep.tvgen.read_image(photo)])
        proposals, _ = model.rpn(batch, model.backbone(batch.tensors))
        props, shape = proposals[0].numpy().copy(), batch.tensors.shape
    return {
        "proposals_0": props,
        "levels_0": capture.levels([props])[0].astype(np.int8),
        "batch_shape": np.array(shape),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", default=list(FIXTURES))
    ap.add_argument("--pick", action="store_true")
    ap.add_argument("--image", default="train_2.jpg")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    scales_path = OUT / "scales.json"
    scales = json.loads(scales_path.read_text()) if scales_path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            path = fixture_checkpoint(family, Path(tmp))
            model, cfg = sweep.load_reference(family, path)
            scales[family] = balanced(family, model, cfg, path)
            capture = sweep.LevelCapture(family, model)
            image = args.image
            if args.pick:
                counts = {
                    c: int((reference_proposals(family, model, cfg, sweep.PHOTOS / c, capture)["levels_0"] == 4).sum())
                    for c in CANDIDATES
                }
                print(family, "P6 proposals per photo:", json.dumps(counts))
                image = max(counts, key=counts.get)
            out = reference_proposals(family, model, cfg, sweep.PHOTOS / image, capture)
            assert (out["levels_0"] >= 0).all()
            side = np.sqrt((out["proposals_0"][:, 2:] - out["proposals_0"][:, :2]).prod(1))
            print(
                family,
                image,
                "batch",
                out["batch_shape"].tolist(),
                "proposals per level",
                np.bincount(out["levels_0"], minlength=5).tolist(),
                "P6 sqrt(area) range",
                [round(float(v)) for v in np.percentile(side[out["levels_0"] == 4], [0, 50, 100])]
                if (out["levels_0"] == 4).any()
                else [],
            )
            np.savez_compressed(OUT / f"levels_{family}.npz", image=np.array(image), **out)
            scales_path.write_text(json.dumps(scales, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
