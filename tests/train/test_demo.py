"""The demo end to end on a tiny model and dataset: outputs, a fresh re-run, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn.cli import main as cli_main
from maskrcnn.train.demo import demo_config, run_demo

# pycocotools.mask trips numpy 2's __array__(copy=) deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# A few seconds: 6 training images of 80x80 px (one aspect-ratio group), a tiny model, 2 iterations.
TINY = [
    "data.synthetic_train=6",
    "data.synthetic_val=3",
    "data.synthetic_size=[80,80]",
    "data.batch_size=2",
    "model.backbone.fpn_channels=16",
    "model.roi_heads.representation_size=16",
    "model.roi_heads.mask_channels=[8]",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=50",
    "model.rpn.post_nms_top_n_test=20",
    "model.roi_heads.batch_size_per_image=16",
    "model.transform.min_size=[64]",
    "model.transform.max_size=96",
    "solver.epochs=1",
    "solver.warmup_iters=1",
    "eval.num_visualize=2",
    "threads=1",
    "progress=false",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the trainer sets threads=1 process-wide


def test_demo_config_puts_everything_under_out(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path / "d", ["solver.epochs=2"], minutes=1.5)
    assert Path(cfg.out_dir) == tmp_path / "d"
    assert Path(cfg.data.synthetic_dir) == tmp_path / "d" / "dataset"
    assert cfg.exist_ok and cfg.data.synthetic == "shapes"
    assert cfg.solver.epochs == 2 and cfg.solver.max_minutes == 1.5


def test_run_demo_end_to_end_and_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # any working directory: nothing is read relative to the repo
    out = Path("runs") / "demo"
    assert run_demo(out, TINY) == 0
    printed = capsys.readouterr().out
    assert "mask AP" in printed and "box AP" in printed

    report = json.loads((out / "metrics.json").read_text())
    for key in ("segm_AP", "segm_AP50", "bbox_AP", "train_seconds", "total_seconds", "iterations", "checkpoint"):
        assert key in report, key
    assert 0.0 <= report["segm_AP"] <= 1.0 or report["segm_AP"] == -1.0
    assert report["iterations"] == 3  # 6 images / batch 2, one epoch
    assert report["stopped"] == "completed"
    for name in ("last.pth", "best.pth", "config.yaml", "metrics.jsonl", "metrics.png", "val_predictions.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "predictions").glob("*.png"))) == 3  # every val image (fewer than 8)
    assert (out / "dataset" / "val" / "annotations.json").is_file()

    # A re-run starts afresh: a stale file in predictions/ is gone, the dataset is reused.
    (out / "predictions" / "stale.png").write_bytes(b"")
    dataset_mtime = (out / "dataset" / "manifest.json").stat().st_mtime_ns
    assert run_demo(out, [*TINY, "solver.max_iters=1"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["iterations"] == 1 and report["stopped"] == "max_iters"
    assert not (out / "predictions" / "stale.png").exists()
    assert (out / "dataset" / "manifest.json").stat().st_mtime_ns == dataset_mtime


def test_demo_cli_help() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--help"])
    assert exit_info.value.code == 0
    done = subprocess.run(
        [sys.executable, "-m", "maskrcnn", "demo", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "--minutes" in done.stdout and "--out" in done.stdout


def test_demo_cli_rejects_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["demo", "--out", str(tmp_path / "d"), "solver.epoch=1"]) == 2
    assert "solver.epochs" in capsys.readouterr().err  # the close-match suggestion
