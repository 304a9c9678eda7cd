"""Sharing on the Hugging Face Hub, against a stand-in of its API on 127.0.0.1 (tests/weights/hub_standin.py):
``maskrcnn push`` uploads safetensors, config and a model card; ``hf://`` loads it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load as load_safetensors

from maskrcnn.cli import main
from maskrcnn.weights.checkpoint import save_checkpoint
from maskrcnn.weights.hub import HubRef, parse

from ..helpers import tiny_model
from .hub_standin import HubStandIn

REPO = Path(__file__).resolve().parents[2]


def _run_cli(commands: list[list[str]], env: dict[str, str]) -> tuple[list[int], str, str]:
    """``maskrcnn.cli.main`` on each argument list, in one fresh process (huggingface_hub reads
    HF_ENDPOINT when imported; one process pays for importing torch once). Exit codes, stdout, stderr."""
    driver = (
        "import json, sys\nfrom maskrcnn.cli import main\nprint(json.dumps([main(a) for a in json.loads(sys.argv[1])]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(commands)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout, done.stderr


def test_push_then_predict_from_hf_gives_the_local_results(tmp_path, capsys):
    run = tmp_path / "runs" / "kudzu"  # a training run folder: config.yaml beside best.pth
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"data": {"train_ann": "data/train.json", "val_ann": "data/val.json"}, "solver": {"epochs": 12}})
    )
    weights = run / "best.pth"
    model = tiny_model()
    save_checkpoint(weights, model, {"epoch": 12, "metrics": {"segm_AP": 0.4321, "bbox_AP": 0.5, "train_loss": 1.2}})
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / "a.png")

    with HubStandIn() as hub:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "test-token",
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1",
        }
        codes, out, err = _run_cli(
            [
                ["push", str(weights), "someone/kudzu-maskrcnn"],
                [
                    "predict",
                    str(images),
                    "--weights",
                    "hf://someone/kudzu-maskrcnn",
                    "--out",
                    str(tmp_path / "hub"),
                    "--quiet",
                ],
                ["predict", str(images), "--weights", "hf://someone/nothing-here", "--out", str(tmp_path / "x")],
                # the same file read locally, in the same environment (threads change the last bits)
                ["predict", str(images), "--weights", str(weights), "--out", str(tmp_path / "local"), "--quiet"],
            ],
            env,
        )
        assert codes == [0, 0, 2, 0], err
        assert 'maskrcnn.load("hf://someone/kudzu-maskrcnn")' in out
        assert err.strip().splitlines()[-1].startswith("error: hf://someone/nothing-here: no model repository")
        # The API calls carry the token (the LFS upload goes to the URL the batch call handed out, without it).
        assert {a for (_, path), a in zip(hub.requests, hub.authorization) if path.startswith("/api/")} == {
            "Bearer test-token"
        }
        files = hub.repos["someone/kudzu-maskrcnn"].files
        assert set(files) == {"model.safetensors", "config.json", "README.md"}
        tensors = load_safetensors(files["model.safetensors"])  # the library's reader, on the uploaded bytes
        own = model.state_dict()
        assert set(tensors) == set(own) and all(torch.equal(tensors[k], own[k]) for k in own)
        config = json.loads(files["config.json"])
        assert config["class_names"] == ["circle", "square", "triangle"] and config["num_classes"] == 3
        card = files["README.md"].decode()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["library_name"] == "maskrcnn"
        for text in (
            "1. circle",
            "3. triangle",
            "train_ann: data/train.json",
            "epochs: 12",
            "| segm_AP | 43.2 |",
            'maskrcnn.load("hf://someone/kudzu-maskrcnn")',
        ):
            assert text in card, text
        assert "train_loss" not in card

        assert ("GET", "/someone/kudzu-maskrcnn/resolve/main/model.safetensors") in hub.requests
        cached = list((tmp_path / "hf-cache").rglob("model.safetensors"))
        assert len(cached) == 1 and cached[0].read_bytes() == files["model.safetensors"]

    local = json.loads((tmp_path / "local" / "predictions.json").read_text())
    remote = json.loads((tmp_path / "hub" / "predictions.json").read_text())
    assert len(local) > 0 and remote == local


def test_hub_names_parse_and_bad_ones_are_one_line_errors():
    assert parse("hf://a/b") == HubRef("a/b", "main", "model.safetensors")
    assert parse("hf://a/b@v1.0/sub/best.safetensors") == HubRef("a/b", "v1.0", "sub/best.safetensors")
    for bad in ("hf://justone", "hf://a/b@", "hf://-a/b"):
        with pytest.raises(ValueError, match="hf://"):
            parse(bad)


def test_push_refuses_a_bad_repo_id_before_any_work(tmp_path, capsys):
    save_checkpoint(tmp_path / "m.pth", tiny_model())
    assert main(["push", str(tmp_path / "m.pth"), "not a repo"]) == 2
    assert "is not a Hub repository id" in capsys.readouterr().err


def test_the_model_card_takes_evaluates_metrics_file(tmp_path):
    from maskrcnn.weights.share import _metrics

    nested = tmp_path / "metrics.json"  # maskrcnn evaluate's layout
    nested.write_text(json.dumps({"bbox": {"AP": 0.5, "AP50": 0.7, "APl": -1.0}, "segm": {"AP": 0.4, "AP75": -1.0}}))
    assert _metrics({"metrics": {"segm_AP": 0.1, "val_loss": 2.0}}, str(nested)) == {
        "bbox_AP": 0.5,
        "bbox_AP50": 0.7,
        "segm_AP": 0.4,
    }
    empty = tmp_path / "other.json"
    empty.write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match="no AP values"):
        _metrics({}, str(empty))


def test_without_the_hub_extra_the_error_names_it(monkeypatch, tmp_path):
    import maskrcnn

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match=r"pip install 'maskrcnn\[hub\]'"):
        maskrcnn.load("hf://owner/name")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ValueError, match=r"pip install 'maskrcnn\[hub\]'"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model())
