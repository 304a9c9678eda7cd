"""Videos, cameras and streams through the model: an annotated video and per-frame JSON Lines.

Decoding and encoding go through PyAV (FFmpeg), the optional extra ``maskrcnn[video]``: any
file FFmpeg reads, a stream URL (``rtsp://``, ``http://``, ...) and, on Linux, a V4L2 camera
(``/dev/video0``). Frames are run through ``predictor.iter_predict`` in batches, as images are
(tiled too, with ``tile``), and for each processed frame:

- ``<name>.jsonl`` gets one line, flushed at once (an interrupted run keeps every finished
  frame): ``{"frame": index in the source, "time": seconds from the start, "detections":
  [COCO results entries with "image_id" = frame index, RLE "segmentation"]}``, or
  ``"error"`` instead of detections for a frame the model failed on;
- ``<name>.mp4`` gets the frame with its detections drawn (H.264 where FFmpeg has it, else
  MPEG-4 Part 2), at the source rate divided by ``stride``, so it plays in real time.

Every ``stride``-th frame is processed (0, K, 2K, ...); the others are decoded and dropped.
"""
from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .model.mask_rcnn import MaskRCNN
from .predictor import iter_predict

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".gif.mp4"}
DEFAULT_FPS = 30.0  # for a camera or stream that states no frame rate


def is_video(name: str) -> bool:
    """True for a video file name, a stream URL or a V4L2 camera device."""
    return "://" in name or name.startswith("/dev/video") or Path(name).suffix.lower() in VIDEO_SUFFIXES


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ValueError("reading video needs PyAV: pip install 'maskrcnn[video]'") from None
    return av


@dataclass
class VideoSummary:
    """What ``predict_video`` did: frames read and processed, detections, where the outputs went."""

    frames_read: int
    frames_processed: int
    detections: int
    failed_frames: int
    video: Path
    jsonl: Path


def output_name(source: str) -> str:
    """The base name of a source's outputs: the file's stem, else the URL's last part, else "stream"."""
    tail = source.rstrip("/").split("://", 1)[-1].split("?", 1)[0]
    return Path(tail).stem or "stream"


def _open(av: Any, source: str) -> Any:
    try:
        if source.startswith("/dev/video"):
            return av.open(source, format="v4l2")
        return av.open(source, timeout=30.0 if "://" in source else None)
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"cannot open video {source}: {e}") from None


def _encoder(av: Any, path: Path, rate: Fraction, width: int, height: int) -> tuple[Any, Any]:
    """An MP4 container and its video stream: H.264 (libx264) when FFmpeg has it, else MPEG-4."""
    container = av.open(str(path), mode="w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"  # what players expect; needs even sides (frames are cropped by one pixel if odd)
    return container, stream


def predict_video(
    model: MaskRCNN,
    source: str,
    out_dir: str | Path,
    stride: int = 1,
    batch_size: int = 1,
    score_thresh: float | None = None,
    precision: str = "fp32",
    tile: int | None = None,
    tile_overlap: float = 0.2,
    category_ids: list[int] | None = None,
    progress: bool = False,
) -> VideoSummary:
    """Detect objects in every ``stride``-th frame of ``source``; write ``out_dir/<name>.mp4``
    and ``out_dir/<name>.jsonl`` (module docstring).

    Args:
        source: a video file, stream URL or camera device.
        stride: process frames 0, stride, 2 * stride, ...
        category_ids: label -> category id table for the JSON entries (identity when None).
        Others: as for ``model.predict``.

    Raises:
        ValueError: PyAV missing, the source cannot be opened or holds no video stream,
            ``stride`` below 1.
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    av = _av()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = output_name(source)
    video_path, jsonl_path = out_dir / f"{name}.mp4", out_dir / f"{name}.jsonl"
    container = _open(av, source)
    if not container.streams.video:
        container.close()
        raise ValueError(f"{source} holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
    width, height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
    total = stream.frames // stride + (stream.frames % stride > 0) if stream.frames else None

    pending: deque[tuple[int, float, np.ndarray]] = deque()  # (index, time, pixels) handed to the model, in order
    read = 0

    def frames() -> Iterator[np.ndarray]:
        nonlocal read
        try:
            for index, frame in enumerate(container.decode(stream)):
                read = index + 1
                if index % stride:
                    continue
                time = float(frame.time) if frame.time is not None else index / fps
                rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
                pending.append((index, time, rgb))
                yield rgb
        except av.FFmpegError as e:  # a stream that breaks off: keep what was done
            log.error("%s: decoding stopped at frame %d: %s", source, read, e)

    from tqdm import tqdm

    writer, ostream = _encoder(av, video_path, Fraction(fps / stride).limit_denominator(1001), width, height)
    processed = detections = failed = 0
    try:
        with open(jsonl_path, "w", encoding="utf-8") as lines, \
                tqdm(total=total, desc=name[-30:], unit="frame", disable=not progress) as bar:
            results = iter_predict(model, frames(), batch_size=batch_size, score_thresh=score_thresh,
                                   keep_images=False, precision=precision, tile=tile, tile_overlap=tile_overlap)
            for result in results:
                index, time, rgb = pending.popleft()
                record: dict[str, Any] = {"frame": index, "time": round(time, 6)}
                if result.error is not None:
                    record["error"] = result.error
                    failed += 1
                else:
                    record["detections"] = result.to_coco(index, category_ids)
                    detections += len(result)
                lines.write(json.dumps(record) + "\n")
                lines.flush()
                # A frame the model failed on is written as it came: the video keeps its timing.
                picture = rgb if result.error is not None else np.asarray(result.plot(rgb, max_size=None))
                out = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture[:height, :width]), format="rgb24")
                out.pts = processed
                for packet in ostream.encode(out):
                    writer.mux(packet)
                processed += 1
                bar.update(1)
        for packet in ostream.encode():  # flush the encoder
            writer.mux(packet)
    finally:
        writer.close()
        container.close()
    return VideoSummary(read, processed, detections, failed, video_path, jsonl_path)

