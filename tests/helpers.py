"""Plain helpers that tests import (fixtures live in the conftest.py files): the ../shared
folder and the parity fixtures' paths, the devices that device-parametrised tests run on, the
checkpoints of the parity recipes (built once per machine), and the tiny model of the API tests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import maskrcnn
from maskrcnn.config import ModelConfig, apply_overrides
from maskrcnn.data.synthetic import generate_shapes
from maskrcnn.model.build import build_model
from maskrcnn.structures import Detections, ModelOutput
from maskrcnn.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKRCNN_SHARED", REPO.parent / "shared"))
TV_PARITY = SHARED / "fixtures" / "tv_parity"
KUDZU = SHARED / "data" / "kudzu_bug"
TV2_PARITY = REPO / "tests" / "fixtures" / "tv2_parity"  # committed: needs nothing from ../shared

# The CPU always; CUDA only where a GPU is present, so a CPU-only machine runs exactly the CPU
# tests and reports no skips. Select one device with ``-k cuda`` / ``-k cpu``.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def need(path: Path) -> Path:
    """Skip the calling test with a clear reason when a shared file or folder is absent."""
    if not path.exists():
        pytest.skip(f"shared material not found: {path} (expected ../shared beside the repo, or set MASKRCNN_SHARED)")
    return path


def build_checkpoint(folder: Path, stem: str, rule: Path | None = None, suffix: str = ".pth") -> Path:
    """The checkpoint of a parity fixture's recipe (``rule``, default ``folder/weights_rule.py``,
    whose ``write_checkpoint(out, folder)`` builds it), built once per machine into the test
    cache (digest-checked); the name carries the recipe's digest, so a regenerated fixture never
    meets a stale file."""
    rule = rule or folder / "weights_rule.py"
    need(rule)
    cache = Path(os.environ.get("MASKRCNN_TEST_CACHE", Path.home() / ".cache" / "maskrcnn-tests"))
    cache.mkdir(parents=True, exist_ok=True)
    digest = json.loads((folder / "spec.json").read_text())["sha256"]
    path = cache / f"{stem}-{digest[:8]}{suffix}"
    if not path.exists():
        spec = importlib.util.spec_from_file_location(f"weights_rule_{stem}", rule)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        tmp = path.with_suffix(".tmp")
        module.write_checkpoint(str(tmp), folder)  # raises if the digest differs
        tmp.replace(path)
    return path


D2_PARITY = REPO / "tests" / "fixtures" / "d2_parity"


def d2_checkpoint(family: str) -> Path:
    """A Detectron2-layout parity checkpoint (``model_final``-style .pkl), built once per machine
    from ``tests/fixtures/d2_parity/FAMILY``'s recipe (digest-checked)."""
    return build_checkpoint(D2_PARITY / family, f"d2_parity_{family}", D2_PARITY / "weights_rule.py", ".pkl")


LEVELS = REPO / "tests" / "fixtures" / "levels"


def level_checkpoint(family: str) -> Path:
    """A parity recipe's checkpoint (tv1, tv2, r50, r101, x101) with its FPN levels balanced: the
    output convs of P3..P5 scaled by ``tests/fixtures/levels/scales.json`` (what
    benchmarks/parity/make_level_fixture.py applied before recording the reference), so that P6
    gives proposals. Built once per machine next to the recipe's file."""
    if family in ("r50", "r101", "x101"):
        base = d2_checkpoint(family)
    else:
        base = (
            build_checkpoint(TV_PARITY, "tv_parity_r50")
            if family == "tv1"
            else build_checkpoint(TV2_PARITY, "tv2_parity_r50")
        )
    scales = json.loads((LEVELS / "scales.json").read_text())[family]
    tag = hashlib.sha256(json.dumps(scales, sort_keys=True).encode()).hexdigest()[:8]
    path = base.with_name(f"{base.stem}-levels-{tag}{base.suffix}")
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        if base.suffix == ".pkl":
            raw = pickle.loads(base.read_bytes())
            for key, f in scales.items():  # the same float32 product as the generator's in-place mul_
                raw["model"][key] = torch.from_numpy(raw["model"][key].copy()).mul_(f).numpy()
            tmp.write_bytes(pickle.dumps(raw, protocol=3))
        else:
            state = torch.load(base, weights_only=True)
            for key, f in scales.items():
                state[key] = state[key].mul_(f)
            torch.save(state, tmp)
        tmp.replace(path)
    return path


# The tiny model of the API, CLI, inference and export tests: overrides on ModelConfig's defaults.
TINY = [
    "num_classes=3",
    "class_names=[circle,square,triangle]",
    "backbone.name=resnet18",
    "backbone.fpn_channels=32",
    "transform.min_size=[96]",
    "transform.max_size=128",
    "roi_heads.representation_size=64",
    "roi_heads.mask_channels=[16,16]",
    "rpn.pre_nms_top_n_test=200",
    "rpn.post_nms_top_n_test=50",
    # an untrained tiny model scores ~1/4 for every class: keep them so there is something to check
    "roi_heads.score_thresh=0.0",
]


def tiny_model(seed: int = 0) -> maskrcnn.MaskRCNN:
    """The TINY model with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return maskrcnn.build_model(apply_overrides(ModelConfig(), TINY)).eval()


def bright_forward(
    self, images, targets=None, propose=None, score_thresh=None
):  # scores 0.9: above any threshold used here
    """A stand-in detector: the bright pixels of each frame are one object of class 1."""
    found = []
    for im in images:
        bright = im.float().mean(0) > 128  # (h, w)
        ys, xs = torch.nonzero(bright, as_tuple=True)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        mask = F.interpolate(bright[y0:y1, x0:x1].float()[None, None], size=(28, 28), mode="bilinear")[0]
        found.append(
            Detections(
                boxes=torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32),
                scores=torch.tensor([0.9]),
                labels=torch.tensor([1]),
                masks=mask,
            )
        )
    return ModelOutput(losses={}, detections=found)


def tiny_eval_set(tmp_path):
    """2 validation images of the synthetic shapes and an untrained tiny checkpoint with their categories."""
    split = generate_shapes(tmp_path / "shapes", num_train=1, num_val=2, image_size=(64, 96), seed=3)["val"]
    ids = [c["id"] for c in json.loads(split.ann_file.read_text())["categories"]]
    cfg = apply_overrides(ModelConfig(), TINY + [f"category_ids={ids}"])
    save_checkpoint(tmp_path / "m.pth", build_model(cfg))
    return split, tmp_path / "m.pth"
