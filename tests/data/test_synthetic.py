from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.data import CocoDataset, ensure_dataset, generate_digits, generate_shapes
from maskrcnn.data.synthetic import DIGIT_NAMES, SHAPE_NAMES

SMALL = dict(num_train=6, num_val=3, image_size=(64, 96))


def _check_split(ann_file: Path, image_dir: Path, names: tuple[str, ...], min_visible: int) -> int:
    ds = CocoDataset(ann_file, image_dir)
    assert ds.class_names == list(names)
    instances = 0
    for image, t, info in ds:
        assert image.shape[1:] == info["orig_size"]
        assert 64 <= min(info["orig_size"]) and max(info["orig_size"]) <= 96
        assert bool(((t.labels >= 1) & (t.labels <= len(names))).all())
        # Occluded pixels were removed from earlier masks, so instance masks are disjoint.
        assert len(t) == 0 or int(t.masks.sum(0).max()) <= 1
        for box, mask in zip(t.boxes, t.masks):
            assert int(mask.sum()) >= min_visible
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(box, tight, atol=1.0), (info, box, tight)
        instances += len(t)
    return instances


@pytest.mark.parametrize("generate, names", [(generate_shapes, SHAPE_NAMES), (generate_digits, DIGIT_NAMES)])
def test_generated_data_loads_consistently(tmp_path: Path, generate, names) -> None:
    paths = generate(tmp_path, **SMALL, seed=3)
    assert set(paths) == {"train", "val"}
    assert len(list(paths["train"].image_dir.glob("*.png"))) == 6
    total = sum(_check_split(p.ann_file, p.image_dir, names, 40) for p in paths.values())
    assert total > 9  # several objects per image survive occlusion


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", **SMALL, seed=5)
    b = generate_shapes(tmp_path / "b", **SMALL, seed=5)
    c = generate_shapes(tmp_path / "c", **SMALL, seed=6)
    assert a["train"].ann_file.read_bytes() == b["train"].ann_file.read_bytes()
    assert (a["val"].image_dir / "000002.png").read_bytes() == (b["val"].image_dir / "000002.png").read_bytes()
    assert a["train"].ann_file.read_bytes() != c["train"].ann_file.read_bytes()


def test_occlusion_drops_hidden_objects(tmp_path: Path) -> None:
    # Many large objects in a small image: some are covered until < min_visible pixels remain.
    paths = generate_shapes(
        tmp_path,
        num_train=10,
        num_val=0,
        image_size=(40, 40),
        objects_per_image=(8, 8),
        object_size=(30, 40),
        max_overlap=1.0,
        min_visible=60,
        seed=0,
    )
    data = json.loads(paths["train"].ann_file.read_text())
    assert len(data["annotations"]) < 80
    assert min(a["area"] for a in data["annotations"]) >= 60
    assert len(data["images"]) == 10
    assert json.loads((tmp_path / "val" / "annotations.json").read_text())["images"] == []


def test_ensure_dataset_reuses_and_regenerates(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    first = ensure_dataset("shapes", out, **SMALL)
    stamp = first["train"].ann_file.stat().st_mtime_ns
    again = ensure_dataset("shapes", out, **SMALL)
    assert again == first and again["train"].ann_file.stat().st_mtime_ns == stamp
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "shapes" and manifest["complete"] and manifest["params"]["num_train"] == 6
    changed = ensure_dataset("shapes", out, **{**SMALL, "num_train": 4})
    assert len(json.loads(changed["train"].ann_file.read_text())["images"]) == 4
    assert len(list(changed["train"].image_dir.glob("*.png"))) == 4  # old files removed


def test_ensure_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        ensure_dataset("digit", tmp_path)
    with pytest.raises(TypeError):
        ensure_dataset("shapes", tmp_path / "x", num_trian=3)
    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="no manifest.json"):
        ensure_dataset("shapes", tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "train").is_dir()


def test_digits_train_and_val_use_disjoint_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from maskrcnn.data import synthetic

    samples, _ = synthetic._digits()
    assert samples.shape == (1797, 8, 8) and 0.0 <= samples.min() and samples.max() <= 1.0
    drawn: list[bytes] = []
    original = synthetic._digit_alpha

    def spy(sample: np.ndarray, size: int) -> np.ndarray:
        drawn.append(sample.tobytes())
        return original(sample, size)

    monkeypatch.setattr(synthetic, "_digit_alpha", spy)
    generate_digits(tmp_path, num_train=20, num_val=0, image_size=(64, 64))
    train = set(drawn)
    drawn.clear()
    generate_digits(tmp_path, num_train=0, num_val=20, image_size=(64, 64))
    assert train and drawn and not train & set(drawn)
