"""``maskrcnn predict clip.mp4 --track --count-line ...``: a clip of moving objects whose ids
and line crossings are known, through the command line; a live source faster than the model."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from maskrcnn.cli import main
from maskrcnn.inference.results import label_color
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.structures import Detections, ModelOutput

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

FPS, FRAMES, H, W = 10, 24, 96, 192
LINE = "96,0,96,96"  # drawn top to bottom: moving left is "in"
RED, GREEN = (230, 30, 30), (30, 230, 30)  # class 1 (the tiny model's "circle"), class 2 ("square")


def objects_at(t: int) -> list[tuple[str, tuple[int, int, int], tuple[int, int, int, int]]]:
    """(name, colour, box x0 y0 x1 y1) of what frame ``t`` shows. A: red, 7 px a frame to the
    right, hidden in frames 11 and 12, while its bottom centre crosses x = 96 (84 -> 105);
    B: red, 6 px a frame to the left, crosses at frame 15 (102 -> 96 -> 90); C: green, still."""
    shown = []
    if t not in (11, 12):
        shown.append(("A", RED, (4 + 7 * t, 12, 24 + 7 * t, 26)))
    shown.append(("B", RED, (170 - 6 * t, 60, 190 - 6 * t, 74)))
    shown.append(("C", GREEN, (40, 36, 60, 52)))
    return shown


def write_clip(path, frames: int = FRAMES) -> None:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(frames):
            rgb = np.zeros((H, W, 3), dtype=np.uint8)
            for _, colour, (x0, y0, x1, y1) in objects_at(t):
                rgb[y0:y1, x0:x1] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def colour_blobs(self, images, targets=None, propose=None, score_thresh=None):  # scores 0.9 pass any threshold used
    """A stand-in detector: each red blob is class 1, each green blob class 2 (robust to H.264's losses)."""
    found = []
    for im in images:
        r, g = im[0].numpy().astype(int), im[1].numpy().astype(int)  # (h, w)
        boxes, labels, masks = [], [], []
        for label, pixels in ((1, (r > 128) & (g < 100)), (2, (g > 128) & (r < 100))):
            blobs, n = ndimage.label(pixels)
            for k, (ys, xs) in enumerate(ndimage.find_objects(blobs), start=1):
                crop = torch.from_numpy(blobs[ys, xs] == k).float()[None, None]  # (1, 1, h, w)
                masks.append(F.interpolate(crop, size=(28, 28), mode="bilinear")[0, 0])
                boxes.append([xs.start, ys.start, xs.stop, ys.stop])
                labels.append(label)
        n = len(boxes)
        found.append(
            Detections(
                boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                scores=torch.full((n,), 0.9),
                labels=torch.tensor(labels, dtype=torch.int64),
                masks=torch.stack(masks) if n else torch.zeros((0, 28, 28)),
            )
        )
    return ModelOutput(losses={}, detections=found)


def predict(ckpt, *args) -> int:
    return main(["predict", "--weights", str(ckpt), *map(str, args), "--quiet"])


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def which(det: dict) -> str:
    """The true object of a detection, by class and row."""
    return "C" if det["category_id"] == 2 else ("A" if det["bbox"][1] < 40 else "B")


def test_tracks_keep_ids_and_line_crossings_are_counted_per_direction(tiny_ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(MaskRCNN, "forward", colour_blobs)
    write_clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    assert predict(tiny_ckpt, tmp_path / "clip.mp4", "--out", out, "--count-line", LINE) == 0
    printed = capsys.readouterr().out

    records = lines_of(out / "clip.jsonl")
    assert len(records) == FRAMES
    ids: dict[str, set[int]] = {"A": set(), "B": set(), "C": set()}
    for r in records:
        assert sorted(which(d) for d in r["detections"]) == sorted(name for name, _, _ in objects_at(r["frame"]))
        for d in r["detections"]:
            ids[which(d)].add(d["track_id"])
    assert all(len(v) == 1 for v in ids.values()) and len(set.union(*ids.values())) == 3, (
        ids
    )  # A keeps its id over the gap

    summary = json.loads((out / "clip.tracks.json").read_text())
    assert summary["tracks"] == 3 and summary["objects"] == {"circle": 2, "square": 1}
    assert summary["crossings"] == {"in": {"circle": 1}, "out": {"circle": 1}}  # B leftwards, A rightwards
    assert summary["line"] == [96, 0, 96, 96] and summary["frames_processed"] == FRAMES
    assert "3 tracks" in printed and "'in': {'circle': 1}" in printed

    with av.open(str(out / "clip.mp4")) as video:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in video.decode(video.streams.video[0])]
    last = frames[-1]
    assert (last[88:92, 96:98] > [180, 180, -1]).all() and (last[88:92, 96:98, 2] < 120).all()  # the yellow line
    (a_id,) = ids["A"]
    trail = last[25:28, 4 + 7 * 5 + 10]  # A's bottom centre in frame 5, black in the source
    assert np.abs(trail - label_color(a_id)).sum(axis=1).min() < 90, trail


def test_a_rerun_replaces_its_own_summary_but_never_a_users_file(tiny_ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(MaskRCNN, "forward", colour_blobs)
    write_clip(tmp_path / "clip.mp4", 3)
    out = tmp_path / "out"
    assert predict(tiny_ckpt, tmp_path / "clip.mp4", "--out", out, "--track") == 0
    assert predict(tiny_ckpt, tmp_path / "clip.mp4", "--out", out, "--track") == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "clip.tracks.json").write_text('{"my": "notes"}')
    capsys.readouterr()
    assert predict(tiny_ckpt, tmp_path / "clip.mp4", "--out", tmp_path / "mine", "--track") == 2
    assert "clip.tracks.json" in capsys.readouterr().err
    assert (tmp_path / "mine" / "clip.tracks.json").read_text() == '{"my": "notes"}'


@pytest.mark.parametrize("args", [["--count-line", "1,2,3"], ["--count-line", "5,5,5,5"]])
def test_a_bad_count_line_is_a_one_line_error_before_any_work(tiny_ckpt, tmp_path, capsys, args):  # noqa: F811
    write_clip(tmp_path / "clip.mp4", 2)
    assert predict(tiny_ckpt, tmp_path / "clip.mp4", "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a counting line") and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 for tmp_path's files: a stream the reader takes as fast as it comes."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_a_stream_faster_than_the_model_drops_frames_and_says_how_many(
    tiny_ckpt, tmp_path, monkeypatch, capsys, served
):  # noqa: F811
    def slow(self, images, *args, **kwargs):
        time.sleep(0.15 * len(images))  # far slower than decoding a 96 x 192 frame
        return colour_blobs(self, images, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", slow)
    write_clip(tmp_path / "live.mp4", 40)
    assert predict(tiny_ckpt, f"{served}/live.mp4", "--out", tmp_path / "out", "--track") == 0
    printed = capsys.readouterr().out
    records = lines_of(tmp_path / "out" / "live.jsonl")
    frames = [r["frame"] for r in records]
    # Each record says how many frames were dropped just before it: the gap in frame numbers.
    assert [r["dropped"] for r in records] == [b - a - 1 for a, b in zip([-1, *frames], frames)]
    assert frames[-1] == 39 and len(records) < 20  # the newest frame is always the one taken
    dropped = sum(r["dropped"] for r in records)
    assert f"{dropped} frames dropped" in printed and f"{len(records)} of 40 frames" in printed
    assert json.loads((tmp_path / "out" / "live.tracks.json").read_text())["frames_dropped"] == dropped
