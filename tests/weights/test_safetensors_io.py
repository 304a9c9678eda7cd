"""Checkpoints as safetensors: written for a .safetensors path, read by content, read back by
the safetensors library itself, and never a way to run code."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maskrcnn.weights.checkpoint import CheckpointError, file_kind, load, read_file, read_weights, save_checkpoint
from maskrcnn.weights.safetensors_io import looks_like
from maskrcnn.weights.share import convert

from ..helpers import tiny_model


def test_a_checkpoint_with_training_state_round_trips(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.full_like(p, 0.5)
    state = {"epoch": 3, "optimizer": optimizer.state_dict(), "betas": (0.9, 0.999), "loss": float("nan"), "note": None}
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, state)
    assert file_kind(path) == "safetensors"
    back = read_file(path)
    assert back["format"] == "maskrcnn-checkpoint/1" and back["config"]["backbone"]["name"] == "resnet18"
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v), k
    ts = back["train_state"]
    assert ts["epoch"] == 3 and ts["betas"] == (0.9, 0.999) and ts["note"] is None and math.isnan(ts["loss"])
    assert ts["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]  # int param ids kept as ints
    assert set(ts["optimizer"]["state"]) == set(optimizer.state_dict()["state"])
    assert torch.equal(ts["optimizer"]["state"][0]["momentum_buffer"], torch.full_like(next(model.parameters()), 0.5))
    # Restored into a fresh optimizer, as a resume does.
    torch.optim.SGD(tiny_model(1).parameters(), lr=0.1, momentum=0.9).load_state_dict(ts["optimizer"])


def test_the_safetensors_library_reads_the_weights_under_their_names(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model)
    tensors = load_file(path)  # the library's own reader, not ours
    own = model.state_dict()
    assert set(tensors) == set(own)
    assert all(torch.equal(tensors[k], own[k]) for k in own)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "maskrcnn-checkpoint/1" and json.loads(meta["maskrcnn"])["config"]["num_classes"] == 3


def test_loading_by_content_whatever_the_name_gives_the_same_detections(tmp_path):
    model = tiny_model()
    path = tmp_path / "weights.pth"  # a safetensors file under a .pth name
    convert_src = tmp_path / "src.pth"
    save_checkpoint(convert_src, model)
    convert(convert_src, path)
    assert file_kind(path) == "safetensors"
    loaded = load(path, fold_bn=False)  # the weights as read, unfolded like ``model``: bit for bit
    image = torch.rand(3, 80, 100)
    with torch.no_grad():
        a, b = model([image]).detections[0], loaded([image]).detections[0]
    assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="exists"):
        convert(convert_src, path)  # never replaces a file


def test_a_plain_state_dict_in_safetensors_reads_as_weights(tmp_path):
    own = tiny_model().state_dict()
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in own.items()}, str(path))  # written by the library, no metadata
    assert set(read_file(path)) == set(own)


def test_damaged_files_are_one_line_errors(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, tiny_model())
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(bytes(data[: 8 + n + 100]))  # header intact, tensor bytes cut short
    with pytest.raises(CheckpointError) as e:
        read_weights(path)
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)
    # Our metadata names a tensor the file lacks.
    save_file(
        {"a": torch.zeros(2)}, str(path), metadata={"maskrcnn": json.dumps({"model": {"x": {"__tensor__": "b"}}})}
    )
    with pytest.raises(CheckpointError, match="damaged"):
        read_file(path)


def test_only_safetensors_layouts_are_taken_for_safetensors():
    assert looks_like(struct.pack("<Q", 10) + b"{", 100)
    assert not looks_like(struct.pack("<Q", 200) + b"{", 100)  # header longer than the file
    assert not looks_like(struct.pack("<Q", 10) + b"[", 100)
    assert not looks_like(b"PK\x03\x04" + b"\0" * 12, 100)  # a torch.save zip


def test_objects_that_need_pickle_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="cannot be stored"):
        save_checkpoint(tmp_path / "x.safetensors", tiny_model(), {"sampler": object()})
    assert not (tmp_path / "x.safetensors").exists()


def test_a_training_run_in_safetensors_resumes_exactly(shapes, tmp_path):  # noqa: F811
    """checkpoint_format=safetensors: last/best.safetensors, no .pth, and a resume from it ends
    where an uninterrupted .pth run ends (weights and SGD momenta; the .pth run is the reference)."""
    from maskrcnn.train.trainer import train

    from ..train.helpers import tiny_train_config

    common = {
        "solver": {"lr": 0.01, "epochs": 1, "warmup_iters": 2},
        "eval": {"every": 1, "num_visualize": 0},
        "data": {"max_train_images": 4},
    }  # 2 iterations
    train(tiny_train_config(shapes, tmp_path / "pth", **common))
    cut = tiny_train_config(
        shapes,
        tmp_path / "st",
        checkpoint_format="safetensors",
        checkpoint_every_iters=1,
        solver={**common["solver"], "max_iters": 1},
        eval=common["eval"],
        data=common["data"],
    )
    assert train(cut)["iterations"] == 1
    assert file_kind(tmp_path / "st" / "last.safetensors") == "safetensors" and not list(
        (tmp_path / "st").glob("*.pth")
    )
    resumed = train(tiny_train_config(shapes, tmp_path / "st", checkpoint_format="safetensors", **common), resume=True)
    assert resumed["iterations"] == 2
    a, b = read_file(tmp_path / "pth" / "last.pth"), read_file(tmp_path / "st" / "last.safetensors")
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=1e-4, atol=1e-6), key
    momenta = [
        (s["momentum_buffer"], b["train_state"]["optimizer"]["state"][k]["momentum_buffer"])
        for k, s in a["train_state"]["optimizer"]["state"].items()
    ]
    assert momenta and all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in momenta)
    assert (tmp_path / "st" / "best.safetensors").is_file()
    with pytest.raises(ValueError, match=r"already holds a run \(last.pth\)"):  # a run in the other format counts
        train(tiny_train_config(shapes, tmp_path / "pth", checkpoint_format="safetensors", **common))
    with pytest.raises(ValueError, match="checkpoint_format must be one of pth, safetensors"):
        train(tiny_train_config(shapes, tmp_path / "x", checkpoint_format="pickle", **common))
