"""Videos, cameras and streams through the model: an annotated video and per-frame JSON Lines.

Decoding and encoding go through PyAV (FFmpeg), the optional extra ``maskrcnn[video]``: any
file FFmpeg reads (animated GIFs too), a stream URL (``rtsp://``, ``http://``, ...) and, on
Linux, a V4L2 camera (``/dev/video0``). Frames are run through ``Predictor.stream`` in
batches, as images are (tiled too, with ``tile``), and for each processed frame:

- ``<name>.jsonl`` gets one line, flushed at once (an interrupted run keeps every finished
  frame): ``{"frame": index in the source, "time": seconds from the first frame, "pts_time":
  the container's own time stamp in seconds (an MPEG-TS file starts at 0.08 s; null where it
  has none), "detections": [COCO results entries with "image_id" = frame index, RLE
  "segmentation"]}``, or ``"error"`` instead of detections for a frame the model failed on;
- ``<name>.mp4`` gets the frame with its detections drawn (H.264 where FFmpeg has it, else
  MPEG-4 Part 2), at the source rate divided by ``stride``, so it plays in real time. Its size
  is the first frame's (rounded up to even sides, as yuv420p needs); a later frame of another
  size is scaled by one factor to fit it and centred on black (letterboxed), never cropped.
  The encoder is flushed on Ctrl-C too, so the video holds every frame the JSON Lines hold.

With ``tracking`` (``inference.tracking.VideoTracking``) each detection also gets a
``"track_id"`` (null for a low-score one that matched no track), the video shows ids and
trails, and ``<name>.tracks.json`` gets the counts. A live source (a stream or camera, by
default) is read on a thread that keeps only the newest frame (``inference.live``): its
records get ``"dropped"``, the frames dropped just before this one, and the summary the total.

Every ``stride``-th frame is processed (0, K, 2K, ...); the others are decoded and dropped.
Both files are created at the first decoded frame: a source with none raises ValueError and
leaves no file. A source that stops before the frame count its header states (a truncated
file) or breaks off with a decoding error is reported in ``VideoSummary.problem``.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from .live import Newest
from .predictor import Predictor
from .tracking import VideoTracking, summary_path

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}
DEFAULT_FPS = 30.0  # for a camera or stream that states no frame rate
# The comment of every annotated video written here: how a later run tells its own earlier
# output (which it replaces, as predict replaces its overlays) from a user's file (never replaced).
OUTPUT_TAG = "maskrcnn predict annotated video"


def is_stream(name: str) -> bool:
    """True for a stream URL or a V4L2 camera device: sources that are not files to expand."""
    return "://" in name or name.startswith("/dev/video")


def is_video(name: str) -> bool:
    """True for a video file name (by its extension), a stream URL or a V4L2 camera device."""
    return is_stream(name) or Path(name).suffix.lower() in VIDEO_SUFFIXES


def is_animated_gif(path: Path) -> bool:
    """True for a GIF of several frames, which is run as a video: as an image, Pillow would
    give its first frame only. A GIF that cannot be read counts as an image (and fails as one, by name)."""
    if path.suffix.lower() != ".gif":
        return False
    try:
        with Image.open(path) as im:
            return bool(getattr(im, "is_animated", False))
    except (OSError, ValueError, SyntaxError):
        return False


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ValueError("reading video needs PyAV: pip install 'maskrcnn[video]'") from None
    return av


@dataclass
class VideoSummary:
    """What ``predict_video`` did: frames read and processed, detections, where the outputs
    went, and why the source ended before its header's frame count (None if it did not)."""

    frames_read: int
    frames_processed: int
    detections: int
    failed_frames: int
    video: Path
    jsonl: Path
    header_frames: int | None = None  # the frame count the container states (None: it states none)
    problem: str | None = None
    frames_dropped: int = 0  # live sources: frames the model was too slow for
    tracks: dict[str, Any] | None = None  # with tracking: VideoTracking.summary()


def output_name(source: str) -> str:
    """The base name of a source's outputs: the file's stem, else the URL's last part, else "stream"."""
    tail = source.rstrip("/").split("://", 1)[-1].split("?", 1)[0]
    return Path(tail).stem or "stream"


def written_by_predict(path: Path) -> bool:
    """True for an earlier output of ``predict_video``, which a new run may replace: an MP4
    carrying ``OUTPUT_TAG``, or JSON Lines whose first line is a frame record. Anything else
    (a user's own video, a file that cannot be read) is False."""
    if path.name.endswith(".tracks.json"):
        from .tracking import written_by_tracking

        return written_by_tracking(path)
    if path.suffix == ".jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline())
        except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
            return False
        return isinstance(first, dict) and "frame" in first and ("detections" in first or "error" in first)
    av = _av()
    try:
        with av.open(str(path)) as container:
            return container.metadata.get("comment") == OUTPUT_TAG
    except (av.FFmpegError, OSError, ValueError):
        return False


def _open(av: Any, source: str) -> Any:
    try:
        if source.startswith("/dev/video"):
            return av.open(source, format="v4l2")
        return av.open(source, timeout=30.0 if "://" in source else None)
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"cannot open video {source}: {e}") from None


def fit(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """``picture`` (h, w, 3) uint8 on a black ``height`` x ``width`` canvas: as it is when it
    fits with at most one pixel to spare a side (the even rounding), else scaled by one factor
    (aspect ratio kept) to fit; centred. Returns (height, width, 3) uint8."""
    h, w = picture.shape[:2]
    if not (height - 1 <= h <= height and width - 1 <= w <= width):
        scale = min(height / h, width / w)
        size = (min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale))))
        picture = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
        h, w = picture.shape[:2]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top : top + h, left : left + w] = picture
    return canvas


class AnnotatedVideo:
    """The annotated MP4: H.264 (libx264) when FFmpeg has it, else MPEG-4. Created at its first
    frame, whose size (rounded up to even sides, as yuv420p needs) it keeps; other sizes go
    through ``fit``. ``close`` flushes the encoder, which holds the last frames back."""

    def __init__(self, av: Any, path: Path, rate: Fraction) -> None:
        self.av, self.path, self.rate = av, path, rate
        self.frames = 0
        self._container: Any = None
        self._stream: Any = None

    def add(self, picture: np.ndarray) -> None:
        """Append one (h, w, 3) uint8 RGB frame."""
        if self._container is None:
            self._start(*picture.shape[:2])
        frame = self.av.VideoFrame.from_ndarray(fit(picture, self._stream.height, self._stream.width), format="rgb24")
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def _start(self, height: int, width: int) -> None:
        self._container = self.av.open(str(self.path), mode="w")
        self._container.metadata["comment"] = OUTPUT_TAG
        codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=self.rate)
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"  # what players expect

    def close(self) -> None:
        """Flush the encoder and finish the file (nothing to do before the first frame)."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None


@dataclass
class _Reading:
    """How far reading got: packets demuxed, frames decoded, the first error (if any)."""

    packets: int = 0  # with data; samples an MP4 edit list trims are demuxed but never decoded
    read: int = 0
    error: str | None = None


def _frames(av: Any, container: Any, stream: Any, reading: _Reading) -> Iterator[Any]:
    """The stream's decoded frames, in order. A packet that fails to decode is skipped, as
    ffmpeg does, so the frames a threaded decoder holds back survive a cut-off file; an error
    reading the container ends it. The first error is kept in ``reading``."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as e:  # a stream that breaks off: keep what was done, report it
            reading.error = reading.error or str(e)
            return
        reading.packets += packet.size > 0
        try:
            yield from packet.decode()  # the last, empty packet flushes the decoder
        except av.FFmpegError as e:
            reading.error = reading.error or str(e)


def _decode(
    av: Any, container: Any, stream: Any, stride: int, fps: float, reading: _Reading
) -> Iterator[tuple[int, float, float | None, np.ndarray]]:
    """(index, seconds from the first frame, container time stamp, (H, W, 3) uint8 RGB) of
    frames 0, stride, 2 * stride, ...; frames read and errors are counted in ``reading``."""
    start: float | None = None
    for index, frame in enumerate(_frames(av, container, stream, reading)):
        reading.read = index + 1
        stamp = float(frame.time) if frame.time is not None else None
        if start is None and stamp is not None:
            start = stamp
        if index % stride:
            continue
        time = stamp - start if stamp is not None and start is not None else index / fps
        yield index, time, stamp, frame.to_ndarray(format="rgb24")


def _shortfall(reading: _Reading, header: int | None) -> str | None:
    """Why the source is incomplete: fewer packets than the frames its header states (counted
    in packets, since an edit list makes a whole file decode to fewer frames), or a decoding error."""
    if header and reading.packets < header:
        why = f"decoded {reading.read} of the {header} frames its header states (a truncated file?)"
    elif reading.error is not None:
        why = f"a decoding error after frame {reading.read}"
    else:
        return None
    return why + (f": {reading.error}" if reading.error else "")


def predict_video(
    predictor: Predictor,
    source: str,
    out_dir: str | Path,
    stride: int = 1,
    progress: bool = False,
    name: str | None = None,
    tracking: VideoTracking | None = None,
    live: bool | None = None,
) -> VideoSummary:
    """Detect objects in every ``stride``-th frame of ``source``; write ``out_dir/<name>.mp4``
    and ``out_dir/<name>.jsonl`` (module docstring), replacing files of those names.

    Args:
        predictor: the model and its options (frames are images: tiling applies, the whole-image
            pass and kept pixels do not).
        source: a video file, stream URL or camera device.
        stride: process frames 0, stride, 2 * stride, ...
        name: the outputs' base name (default ``output_name(source)``).
        tracking: follow objects across frames (module docstring); also writes ``<name>.tracks.json``.
        live: keep only the newest frame, dropping those the model is too slow for (default:
            for streams and cameras, ``is_stream(source)``).

    Raises:
        ValueError: PyAV missing, the source cannot be opened, holds no video stream or no
            frame that decodes, ``stride`` below 1.
        KeyboardInterrupt: after both files are finished with every processed frame.
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    av = _av()
    out_dir = Path(out_dir)
    name = name or output_name(source)
    container = _open(av, source)
    newest: Newest | None = None
    try:
        if not container.streams.video:
            raise ValueError(f"{source} holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        header = stream.frames or None  # 0: the container states no count (streams, MPEG-TS, most MKV)
        reading = _Reading()
        frames = _decode(av, container, stream, stride, fps, reading)
        newest = Newest(frames) if (is_stream(source) if live is None else live) else None
        out_dir.mkdir(parents=True, exist_ok=True)
        video = AnnotatedVideo(av, out_dir / f"{name}.mp4", Fraction(fps / stride).limit_denominator(1001))
        total = -(-header // stride) if header else None
        frame_predictor = Predictor(predictor.model, predictor.options, keep_images=False, tile_whole=False)
        summary = _annotate(
            frame_predictor, newest or frames, video, out_dir / f"{name}.jsonl", total, progress, tracking, newest
        )
    finally:
        if newest is not None:
            newest.close()  # the reader thread lets go of the container first
        container.close()
    if not summary.frames_processed:
        why = _shortfall(reading, header) or "it holds none"
        raise ValueError(f"{source}: no frame could be decoded ({why}); nothing written")
    summary.frames_read, summary.header_frames, summary.problem = reading.read, header, _shortfall(reading, header)
    return summary


def _annotate(
    predictor: Predictor,
    frames: Iterable[tuple[int, float, float | None, np.ndarray]],
    video: AnnotatedVideo,
    jsonl: Path,
    total: int | None,
    progress: bool,
    tracking: VideoTracking | None = None,
    newest: Newest | None = None,
) -> VideoSummary:
    """Run the model over ``frames``; one JSON line and one annotated frame for each."""
    from tqdm import tqdm

    pending: deque[tuple[int, float, float | None, np.ndarray]] = deque()  # handed to the model, in order

    def pixels() -> Iterator[np.ndarray]:
        for item in frames:
            pending.append(item)
            yield item[3]

    summary = VideoSummary(0, 0, 0, 0, video.path, jsonl)
    lines: IO[str] | None = None  # opened at the first frame: a source with none leaves no file
    try:
        with tqdm(total=total, desc=video.path.stem[-30:], unit="frame", disable=not progress) as bar:
            for result in predictor.stream(pixels()):
                index, time, stamp, rgb = pending.popleft()
                record: dict[str, Any] = {
                    "frame": index,
                    "time": round(time, 6),
                    "pts_time": None if stamp is None else round(stamp, 6),
                }
                if result.error is not None:
                    record["error"] = result.error
                    summary.failed_frames += 1
                else:
                    record["detections"] = result.to_coco(index)  # COCO category ids: Result's own table
                    summary.detections += len(result)
                    for entry, track_id in zip(record["detections"], tracking.update(result) if tracking else ()):
                        entry["track_id"] = track_id
                if newest is not None:
                    record["dropped"] = newest.dropped_before[summary.frames_processed]
                if lines is None:
                    lines = open(jsonl, "w", encoding="utf-8")  # noqa: SIM115  closed below
                lines.write(json.dumps(record) + "\n")
                lines.flush()
                # A frame the model failed on is written as it came: the video keeps its timing.
                picture = rgb if result.error is not None else result.plot(rgb, max_size=None)
                if tracking is not None and result.error is None:
                    picture = tracking.draw(picture)
                video.add(np.asarray(picture))
                summary.frames_processed += 1
                bar.update(1)
    except KeyboardInterrupt:
        log.warning(
            "interrupted: the %d finished frame(s) are in %s and %s", summary.frames_processed, video.path, jsonl
        )
        raise
    finally:
        video.close()  # flushed on every exit, Ctrl-C included
        if lines is not None:
            lines.close()
        summary.frames_dropped = newest.dropped if newest is not None else 0
        if tracking is not None and summary.frames_processed:  # the counts so far, on Ctrl-C too
            summary.tracks = tracking.write(
                summary_path(jsonl.parent, jsonl.stem), summary.frames_processed, summary.frames_dropped
            )
    return summary
