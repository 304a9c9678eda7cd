"""``maskrcnn predict clip.mp4``: a synthetic clip of a moving square through the command line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.checkpoint import save_checkpoint
from maskrcnn.cli import main
from maskrcnn.masks import decode_one
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.structures import Detections, ModelOutput
from maskrcnn.video import is_video, output_name

from .test_api import tiny_model

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

FPS, FRAMES, H, W, SIDE = 10, 12, 96, 128, 24


def square_at(index: int) -> tuple[int, int]:
    """Top-left (x, y) of the square in frame ``index``: 6 px to the right per frame."""
    return 10 + 6 * index, 30


def write_clip(path) -> None:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(FRAMES):
            rgb = np.zeros((H, W, 3), dtype=np.uint8)
            x, y = square_at(i)
            rgb[y : y + SIDE, x : x + SIDE] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def bright_forward(self, images, targets=None, propose=None, score_thresh=None):  # scores 0.9: above any threshold used here
    """A stand-in detector: the bright pixels of each frame are one object of class 1."""
    found = []
    for im in images:
        bright = im.float().mean(0) > 128  # (h, w)
        ys, xs = torch.nonzero(bright, as_tuple=True)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        mask = F.interpolate(bright[y0:y1, x0:x1].float()[None, None], size=(28, 28), mode="bilinear")[0]
        found.append(Detections(boxes=torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), scores=torch.tensor([0.9]),
                                labels=torch.tensor([1]), masks=mask))
    return ModelOutput(losses={}, detections=found)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, tiny_model())
    return path


@pytest.mark.parametrize("stride", [1, 5])
def test_a_clip_gives_an_annotated_video_and_one_json_line_per_processed_frame(tiny_ckpt, tmp_path, monkeypatch, capsys, stride):
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(tiny_ckpt), str(clip), "--out", str(out), "--stride", str(stride),
                 "--batch-size", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    expected = list(range(0, FRAMES, stride))  # 0..11, or 0, 5, 10

    records = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == expected
    for r in records:
        assert r["time"] == pytest.approx(r["frame"] / FPS, abs=1e-3)
        (det,) = r["detections"]
        x, y = square_at(r["frame"])
        # The stand-in sees the decoded (lossy) frame: the square within a pixel or two.
        np.testing.assert_allclose(det["bbox"], [x, y, SIDE, SIDE], atol=2)
        assert det["image_id"] == r["frame"] and det["category_id"] == 1
        top, left, crop = decode_one({"size": det["segmentation"]["size"], "counts": det["segmentation"]["counts"].encode()})
        assert det["segmentation"]["size"] == [H, W]
        assert abs(top - y) <= 2 and abs(left - x) <= 2 and crop.mean() > 0.9

    with av.open(str(out / "clip.mp4")) as annotated:
        stream = annotated.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(FPS / stride, rel=0.01)  # plays in real time
        frames = [f.to_ndarray(format="rgb24") for f in annotated.decode(stream)]
    assert len(frames) == len(expected) and frames[0].shape == (H, W, 3)
    for n, frame in zip(expected, frames):
        x, y = square_at(n)
        centre = frame[y + SIDE // 2, x + SIDE // 2].astype(int)
        # White under a 45% blend of class 1's colour (255, 157, 151): green and blue fall to ~210.
        assert centre[0] > 230 and 180 < centre[1] < 235 and 180 < centre[2] < 235, centre
    assert math.isclose(len(frames), math.ceil(FRAMES / stride))


def test_a_file_that_is_not_a_video_is_a_one_line_error(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    code = main(["predict", "--weights", str(tiny_ckpt), str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.mp4" in err and len(err.strip().splitlines()) == 1


def test_videos_streams_and_cameras_are_told_from_images():
    assert is_video("a/clip.MP4") and is_video("rtsp://cam.local/stream1") and is_video("/dev/video0")
    assert not is_video("big.tif") and not is_video("photo.jpg")
    assert output_name("rtsp://cam.local/live/front.sdp?x=1") == "front" and output_name("http://host/") == "host"
