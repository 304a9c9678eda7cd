"""``maskrcnn predict clip.mp4``: a synthetic clip of a moving square through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.inference.masks import decode_one
from maskrcnn.inference.video import is_video, output_name
from maskrcnn.model.mask_rcnn import MaskRCNN

from ..helpers import bright_forward, tiny_model

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

FPS, FRAMES, H, W, SIDE = 10, 12, 96, 128, 24


def square_at(index: int) -> tuple[int, int]:
    """Top-left (x, y) of the square in frame ``index``: 6 px to the right per frame."""
    return 10 + 6 * index, 30


def write_clip(path, frames: int = FRAMES, **options) -> None:
    """``frames`` frames of the moving square (``options``: the container's, e.g. movflags)."""
    with av.open(str(path), mode="w", options=options) as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(frames):
            rgb = np.zeros((H, W, 3), dtype=np.uint8)
            x, y = square_at(i)
            rgb[y : y + SIDE, x : x + SIDE] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("stride", [1, 5])
def test_a_clip_gives_an_annotated_video_and_one_json_line_per_processed_frame(
    tiny_ckpt, tmp_path, monkeypatch, capsys, stride
):
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--weights",
            str(tiny_ckpt),
            str(clip),
            "--out",
            str(out),
            "--stride",
            str(stride),
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
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
        top, left, crop = decode_one(
            {"size": det["segmentation"]["size"], "counts": det["segmentation"]["counts"].encode()}
        )
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
    code = main(
        ["predict", "--weights", str(tiny_ckpt), str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "o"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "broken.mp4" in err and len(err.strip().splitlines()) == 1


def test_videos_streams_and_cameras_are_told_from_images():
    assert is_video("a/clip.MP4") and is_video("rtsp://cam.local/stream1") and is_video("/dev/video0")
    assert not is_video("big.tif") and not is_video("photo.jpg")
    assert output_name("rtsp://cam.local/live/front.sdp?x=1") == "front" and output_name("http://host/") == "host"


# ---- issue 17: what a new user met with videos ---------------------------------------------


def predict(ckpt, *args: str) -> int:
    return main(["predict", "--weights", str(ckpt), *map(str, args), "--quiet"])


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def frames_of(path) -> list[np.ndarray]:
    with av.open(str(path)) as video:
        return [f.to_ndarray(format="rgb24") for f in video.decode(video.streams.video[0])]


def faststart_clip(path, frames: int) -> bytes:
    """The bytes of a clip whose header (moov) comes first, so a cut-off copy still opens."""
    write_clip(path, frames, movflags="faststart")
    return path.read_bytes()


def test_a_video_with_a_stream_but_no_frame_is_a_one_line_error_and_writes_nothing(tiny_ckpt, tmp_path, capsys):
    data = faststart_clip(tmp_path / "full.mp4", FRAMES)
    (tmp_path / "empty.mp4").write_bytes(data[: data.index(b"mdat") + 4])  # the header, no frame data
    code = predict(tiny_ckpt, tmp_path / "empty.mp4", "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "empty.mp4" in err and "no frame" in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_truncated_video_warns_with_frames_decoded_and_stated_and_exits_1(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    data = faststart_clip(tmp_path / "full.mp4", 60)
    start = data.index(b"mdat")
    (tmp_path / "cut.mp4").write_bytes(data[: start + int((len(data) - start) * 0.6)])  # 60% of the frame data
    code = predict(tiny_ckpt, tmp_path / "cut.mp4", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    decoded = len(lines_of(tmp_path / "out" / "cut.jsonl"))
    assert code == 1 and 0 < decoded < 60 and f"decoded {decoded} of the 60 frames its header states" in err, err
    assert len(frames_of(tmp_path / "out" / "cut.mp4")) == decoded


def test_two_videos_of_one_name_get_two_outputs_as_images_do(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_clip(tmp_path / "a" / "clip.mp4", 4)
    write_clip(tmp_path / "b" / "clip.mp4", 3)
    write_clip(tmp_path / "b" / "clip.mkv", 2)
    out = tmp_path / "out"
    code = predict(
        tiny_ckpt, tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4", tmp_path / "b" / "clip.mkv", "--out", out
    )
    assert code == 0, capsys.readouterr().err
    for name, frames in (("clip", 4), ("clip_2", 3), ("clip_3", 2)):  # each its own, in input order
        assert len(lines_of(out / f"{name}.jsonl")) == frames and len(frames_of(out / f"{name}.mp4")) == frames


def test_no_video_output_replaces_a_users_file_but_a_rerun_replaces_its_own(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    folder = tmp_path / "dir"
    folder.mkdir()
    write_clip(folder / "clip.mkv", 3)
    (folder / "clip.mp4").write_bytes(b"the user's own video")
    code = predict(tiny_ckpt, folder / "clip.mkv", "--out", folder)
    err = capsys.readouterr().err
    assert code == 2 and "clip.mp4" in err and "not written by maskrcnn predict" in err, err
    assert (folder / "clip.mp4").read_bytes() == b"the user's own video" and not (folder / "clip.jsonl").exists()

    out = tmp_path / "out"  # our own outputs of an earlier run are replaced, as overlays are
    assert predict(tiny_ckpt, folder / "clip.mkv", "--out", out) == 0
    assert predict(tiny_ckpt, folder / "clip.mkv", "--out", out, "--stride", "2") == 0, capsys.readouterr().err
    assert [r["frame"] for r in lines_of(out / "clip.jsonl")] == [0, 2]


def test_ctrl_c_keeps_every_finished_frame_in_the_video_too(tiny_ckpt, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(self, images, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return bright_forward(self, images, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", interrupted)
    write_clip(tmp_path / "clip.mp4")
    assert predict(tiny_ckpt, tmp_path / "clip.mp4", "--out", tmp_path / "out") == 130
    assert [r["frame"] for r in lines_of(tmp_path / "out" / "clip.jsonl")] == [0, 1, 2, 3, 4]
    assert len(frames_of(tmp_path / "out" / "clip.mp4")) == 5  # the encoder's held-back frames flushed


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_videos_in_a_folder_or_a_glob_are_run_as_videos_beside_its_images(
    tiny_ckpt, tmp_path, monkeypatch, capsys, how
):
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    folder = tmp_path / "vfolder"
    folder.mkdir()
    write_clip(folder / "clip.mp4", 3)
    write_clip(folder / "other.mkv", 2)
    still = np.zeros((H, W, 3), np.uint8)
    still[10:30, 10:30] = 255
    Image.fromarray(still).save(folder / "still.png")
    out = tmp_path / "out"
    code = predict(tiny_ckpt, folder if how == "folder" else f"{folder}/*", "--out", out)
    assert code == 0, capsys.readouterr().err
    assert len(lines_of(out / "clip.jsonl")) == 3 and len(lines_of(out / "other.jsonl")) == 2
    assert [im["file_name"] for im in json.loads((out / "images.json").read_text())] == [str(folder / "still.png")]


def test_time_is_seconds_from_the_first_frame_and_the_container_stamp_is_kept(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    with av.open(str(tmp_path / "clip.ts"), mode="w", format="mpegts") as out:  # MPEG-TS starts past 0
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(5):
            rgb = np.zeros((H, W, 3), np.uint8)
            rgb[30:54, 10 + 6 * i : 34 + 6 * i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert predict(tiny_ckpt, tmp_path / "clip.ts", "--out", tmp_path / "out") == 0, capsys.readouterr().err
    records = lines_of(tmp_path / "out" / "clip.jsonl")
    assert [r["time"] for r in records] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=1e-3)
    assert records[0]["pts_time"] > 0.05  # the raw stamp, for tools that sync on it
    assert all(r["pts_time"] - r["time"] == pytest.approx(records[0]["pts_time"], abs=1e-3) for r in records)


def test_frames_larger_than_the_first_are_scaled_to_fit_not_cropped(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """An MPEG-TS stream whose resolution doubles after 3 frames (two files joined, as TS allows);
    every frame has a white 10-px corner at its bottom right, which cropping would cut off."""
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    parts = []
    for k, (h, w) in enumerate([(H, W), (2 * H, 2 * W)]):
        with av.open(str(tmp_path / f"part{k}.ts"), mode="w", format="mpegts") as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for i in range(3):
                rgb = np.zeros((h, w, 3), np.uint8)
                rgb[-10:, -10:] = 255
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = 3 * k + i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        parts.append((tmp_path / f"part{k}.ts").read_bytes())
    (tmp_path / "grow.ts").write_bytes(b"".join(parts))
    assert predict(tiny_ckpt, tmp_path / "grow.ts", "--out", tmp_path / "out") == 0, capsys.readouterr().err
    assert [r["detections"][0]["segmentation"]["size"] for r in lines_of(tmp_path / "out" / "grow.jsonl")] == [
        [H, W]
    ] * 3 + [[2 * H, 2 * W]] * 3  # detections stay in each frame's own pixels
    frames = frames_of(tmp_path / "out" / "grow.mp4")
    assert len(frames) == 6 and all(f.shape == (H, W, 3) for f in frames)
    for f in frames:  # the corner shows in every frame: the large ones shrunk by 2 (a 5-px corner)
        assert f[-4:, -4:].mean() > 150 and f[: H // 2, : W // 2].mean() < 40


def test_an_animated_gif_is_run_frame_by_frame(tiny_ckpt, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(MaskRCNN, "forward", bright_forward)
    pictures = []
    for i in range(4):
        rgb = np.zeros((H, W, 3), np.uint8)
        x, y = square_at(i)
        rgb[y : y + SIDE, x : x + SIDE] = 255
        pictures.append(Image.fromarray(rgb))
    pictures[0].save(tmp_path / "anim.gif", save_all=True, append_images=pictures[1:], duration=100, loop=0)
    assert predict(tiny_ckpt, tmp_path / "anim.gif", "--out", tmp_path / "out") == 0, capsys.readouterr().err
    records = lines_of(tmp_path / "out" / "anim.jsonl")
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    for r in records:  # each frame's own square, not the first frame's
        x, y = square_at(r["frame"])
        np.testing.assert_allclose(r["detections"][0]["bbox"], [x, y, SIDE, SIDE], atol=1)
    assert len(frames_of(tmp_path / "out" / "anim.mp4")) == 4
    with caplog.at_level("WARNING"):  # the API reads one image per path: it says so
        tiny_model().predict(tmp_path / "anim.gif")
    assert "anim.gif has 4 frames; only the first is read" in caplog.text
