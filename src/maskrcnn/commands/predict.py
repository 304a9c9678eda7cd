"""``maskrcnn predict``: image and video files in, result files out.

Inputs are expanded (files, folders, glob patterns), checked against the outputs before any
work (no output replaces an input or a file that predict did not write), then images go
through one ``Predictor`` into ``PredictionFiles`` and overlays, and each video, stream or
camera into an annotated video and JSON Lines (``video.predict_video``).
"""

from __future__ import annotations

import glob
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from ..applications.writers import build_writers
from ..applications.writers import refuse_replacing_user_files as refuse_replacing_writers_files
from ..data.images import IMAGE_SUFFIXES
from ..files import refuse_overwriting_inputs
from ..inference.input_size import with_input_size
from ..inference.options import PredictOptions
from ..inference.outputs import PredictionFiles, coco_image_ids
from ..inference.predictor import Predictor
from ..inference.results import Result
from ..inference.tracking import VideoTracking, parse_line
from ..inference.video import is_animated_gif, is_stream, is_video, output_name, predict_video, written_by_predict
from ..weights.checkpoint import load

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """Options that cannot apply to these inputs (the command line shows its usage with it)."""


@dataclass
class PredictSummary:
    """What a ``predict_files`` run did: counts, and one message per input that failed."""

    images: int = 0  # images with results written
    detections: int = 0
    failed: list[str] = field(default_factory=list)  # inputs skipped or failed, one line each
    videos_failed: int = 0  # videos, streams, cameras that failed or ended early


@dataclass(frozen=True)
class FileOutputs:
    """What ``predict_files`` writes besides the overlays and COCO results, and how it reads
    videos: the command's own options (how the model runs is ``PredictOptions``'). Checked when
    made, before any input is read."""

    coco: str | None = None  # a COCO JSON whose image ids the images' results take, matched by file name
    stride: int = 1  # videos: every stride-th frame
    export: tuple[str, ...] = ()  # pre-annotations for these tools: labelme, yolo, cvat, labelstudio (out/<tool>/)
    labels: bool = False  # microscopy: out/labels/<name>.tif and out/measurements.csv (applications.labels)
    geojson: bool = False  # out/<name>.geojson, in the raster's CRS for a GeoTIFF (applications.polygon_files)
    polygons: bool = False  # out/polygons.json: COCO results with polygon segmentations
    polygon_tolerance: float | None = None  # simplification of --geojson and --polygons outlines, pixels
    track: bool = False  # videos: follow objects across frames (inference.tracking; <name>.tracks.json)
    count_line: str | None = None  # videos: "x1,y1,x2,y2", count crossings per direction (implies track)
    quiet: bool = False  # no progress bars

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {self.stride}")
        unknown = sorted(set(self.export) - set(EXPORT_TOOLS))
        if unknown:
            raise ValueError(f"--export {', '.join(unknown)}: not one of {', '.join(EXPORT_TOOLS)}")
        if self.count_line:
            parse_line(self.count_line)  # a bad line fails before any work

    @property
    def tracking(self) -> bool:
        return self.track or bool(self.count_line)


EXPORT_TOOLS = ("labelme", "yolo", "cvat", "labelstudio")


def predict_files(
    weights: str,
    inputs: list[str],
    out: str | Path,
    options: PredictOptions,
    outputs: FileOutputs = FileOutputs(),
    *,
    device: str = "cpu",
    input_size: int | None = None,
    max_detections: int | None = None,
) -> PredictSummary:
    """Images -> ``out/overlays/<name>.png``, ``out``'s COCO results files and ``outputs``' files;
    videos, animated GIFs, streams and cameras -> ``out/<name>.mp4`` and ``<name>.jsonl`` each.

    Args:
        weights: the model file (``maskrcnn.load``), loaded once the inputs are checked.
        inputs: image or video files, folders, glob patterns, stream URLs, camera devices.
        options: how the model runs (``tile_whole`` applies to images only).
        outputs: what else to write, and how to read videos.
        device, input_size, max_detections: the model: where it runs, the short side images
            are resized to (``inference.input_size.with_input_size``), its ``detections_per_img``
            (PyTorch models; an ONNX file has its own).

    Raises:
        ValueError: nothing to predict on, options that do not apply to the inputs
            (``UsageError``), an output that would replace an input or a user's file: all
            before the model is loaded.
    """
    out = Path(out)
    writers = build_writers(
        out, outputs.labels, outputs.geojson, outputs.polygons, outputs.polygon_tolerance
    )  # a missing library is told first
    streams = [i for i in inputs if is_stream(i)]
    paths, failed = expand_inputs([i for i in inputs if not is_stream(i)])
    videos = [p for p in paths if is_video(str(p)) or is_animated_gif(p)]
    images = [p for p in paths if p not in set(videos)]
    if not (images or videos or streams):
        raise ValueError(f"no images or videos found in {' '.join(inputs)}")
    if options.tile_whole and (videos or streams):
        raise UsageError("--tile-whole applies to images only, not to videos, streams or cameras")
    if outputs.tracking and not (videos or streams):
        raise UsageError("--track and --count-line apply to videos, streams and cameras")
    line = parse_line(outputs.count_line) if outputs.count_line else None
    if (writers or outputs.export) and not images:
        raise UsageError("--labels, --geojson, --polygons and --export apply to images; no image among the inputs")
    overlays = [out / "overlays" / f"{n}.png" for n in unique_names([p.stem for p in images])]
    sources = [*streams, *map(str, videos)]
    names = unique_names([output_name(s) for s in sources], taken={"predictions"})  # predictions.jsonl is the images'
    video_files = [out / f"{n}{ext}" for n in names for ext in (".mp4", ".jsonl")]
    video_files += [out / f"{n}.tracks.json" for n in names] if outputs.tracking else []
    results = PredictionFiles(out).paths() if images else []
    named = {o.stem: p for o, p in zip(overlays, images)}  # unique output name -> image
    exporters = export_writers(outputs.export, out, named)
    exported = [p for w in exporters for p in w.targets(named)]
    exported += refuse_replacing_writers_files(writers, [o.stem for o in overlays])  # type: ignore[arg-type]
    # Before any work: no output replaces an input, or a file that predict did not write.
    refuse_overwriting_inputs(paths, [*overlays, *results, *video_files, *exported])
    refuse_replacing_user_files(results, video_files)
    # Images missing from the --coco file get ids past its largest, never one of its ids.
    gt_ids = coco_image_ids(images, outputs.coco) if outputs.coco else ([None] * len(images), 1)

    model = load(weights, device=device, **({"detections_per_img": max_detections} if max_detections else {}))
    if input_size:
        with_input_size(model, input_size)
    if exporters and not model.config.masks:
        raise ValueError("--export writes mask polygons, and this model predicts boxes only")
    if exporters:
        from ..data.formats.common import class_list

        for exporter in exporters:  # every class of the model, detected or not: ids come back unchanged
            exporter.classes = class_list(model.config)
    predictor = Predictor(model, options)
    summary = PredictSummary(failed=failed)
    for source, name in zip(sources, names):
        tracking = VideoTracking(line=line) if outputs.tracking else None
        if not _predict_video(predictor, source, out, name, outputs.stride, outputs.quiet, tracking):
            summary.videos_failed += 1
    if images:
        _predict_images(predictor, images, overlays, gt_ids, out, summary, outputs.quiet, [*exporters, *writers])
    return summary


def _predict_images(
    predictor: Predictor,
    paths: list[Path],
    overlays: list[Path],
    gt_ids: tuple[list[int | None], int],
    out: Path,
    summary: PredictSummary,
    quiet: bool,
    writers: Sequence[OutputWriter] = (),
) -> None:
    """Each image -> ``overlays[i]``, ``out``'s results files and each of ``writers``; failures
    to ``summary.failed``. ``gt_ids``: each image's ``--coco`` id or None, and the first id free
    for the others."""
    ids, first_free = gt_ids
    table = predictor.model.config.label_categories()
    files = PredictionFiles(out)
    with files, tqdm(total=len(paths), desc="predict", unit="img", disable=quiet) as bar:
        try:
            for i, result in enumerate(predictor.stream(paths)):
                bar.update(1)
                if result.error is not None:  # logged as it happened; listed again at the end
                    summary.failed.append(result.error)
                    continue
                image_id = ids[i] if ids[i] is not None else first_free + i
                result.save(overlays[i])
                files.add(image_id, str(paths[i]), result, result.to_coco(image_id, table))
                for writer in writers:
                    writer.add(image_id, overlays[i].stem, paths[i], result)
        finally:  # Ctrl-C or a crash too: the once-at-end files cover the images done, as the results do
            for writer in writers:
                writer.close()
    summary.images, summary.detections = files.images, files.detections
    print(
        f"{files.images} images, {files.detections} detections -> {out}/ "
        "(overlays/, predictions.json, predictions.jsonl, images.json)"
    )


class OutputWriter(Protocol):
    """One more output of ``predict`` per image (pre-annotations for a tool, label images,
    GeoJSON, ...), beside the COCO results files."""

    def add(self, image_id: int, name: str, path: Path, result: Result) -> None:
        """One finished image; ``name`` is its unique output stem."""

    def close(self) -> None:
        """Whatever is written once at the end, atomically."""


class Exporter(OutputWriter, Protocol):
    """An ``--export`` writer: pre-annotations for one annotation tool (``data.formats``)."""

    classes: list[str]  # the model's class names by category id (``formats.common.class_list``)

    def targets(self, images: dict[str, Path]) -> list[Path]:
        """The files it will write for these images (unique output name -> image file)."""

    def check(self, images: dict[str, Path]) -> None:
        """ValueError, before any work, if it would replace a file the user edited."""


def export_writers(formats: Sequence[str], out: Path, images: dict[str, Path]) -> list[Exporter]:
    """``--export``: one pre-annotation writer per tool (``data.formats``), each checked before any
    work not to replace a file the user edited. ``images``: unique output name -> image file."""
    from ..data.formats import CvatWriter, LabelMeWriter, LabelStudioWriter, YoloWriter

    kinds = {"labelme": LabelMeWriter, "yolo": YoloWriter, "cvat": CvatWriter, "labelstudio": LabelStudioWriter}
    writers = [kinds[f](out) for f in dict.fromkeys(formats)]
    for w in writers:
        w.check(images)
    return writers


def _predict_video(
    predictor: Predictor,
    source: str,
    out: Path,
    name: str,
    stride: int,
    quiet: bool,
    tracking: VideoTracking | None = None,
) -> bool:
    """One video, stream or camera -> ``out/<name>.mp4`` and ``<name>.jsonl``. False when it
    failed or ended before its header's frame count, told in one line as it happens."""
    try:
        done = predict_video(predictor, source, out, stride=stride, progress=not quiet, name=name, tracking=tracking)
    except ValueError as e:  # cannot open, no video stream, no frame, PyAV missing: one line, go on
        print(f"error: {e}", file=sys.stderr)
        return False
    if done.problem is not None:  # truncated or broken off: what was decoded is kept
        print(f"warning: {source}: {done.problem}", file=sys.stderr)
    print(
        f"{source}: {done.frames_processed} of {done.frames_read} frames, {done.detections} detections -> "
        f"{done.video}, {done.jsonl}"
    )
    if done.frames_dropped:
        print(f"{source}: {done.frames_dropped} frames dropped: the model was slower than the source")
    if done.tracks is not None:
        print(
            f"{source}: {done.tracks['tracks']} tracks {done.tracks['objects']}"
            + (f", crossings {done.tracks['crossings']}" if "crossings" in done.tracks else "")
        )
    return done.problem is None


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images and videos, by extension, sorted) and glob patterns -> file
    paths, in order, unique. The one expansion of ``predict``'s inputs: images and videos are
    told apart afterwards, whichever way they were named.

    Returns:
        The paths, and one message (logged too) for each input skipped: a name that matches
        nothing, or an entry that is not a regular file (a FIFO would block the reader forever).
    """
    paths: list[Path] = []
    skipped: list[str] = []

    def add(p: Path) -> None:
        if p.is_file():  # a regular file, or a link to one
            paths.append(p)
        elif not p.is_dir():
            skipped.append(f"not a regular file (FIFO, socket, device or broken link), skipped: {p}")
            log.error("%s", skipped[-1])

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for q in sorted(p.iterdir()):
                if q.suffix.lower() in IMAGE_SUFFIXES or is_video(q.name):
                    add(q)
        elif p.exists() or p.is_symlink():
            add(p)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                skipped.append(f"no such file, folder or pattern: {item}")
                log.error("%s", skipped[-1])
            for m in matches:
                add(Path(m))
    seen: set[Path] = set()
    unique = [p for p in paths if not (p.resolve() in seen or seen.add(p.resolve()))]  # type: ignore[func-returns-value]
    return unique, skipped


def unique_names(stems: list[str], taken: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """One output name per input (images and videos alike): its stem, with ``_2``, ``_3``, ...
    where inputs share a stem or it is ``taken``, so that no output of a run replaces another."""
    names, used = [], set(taken)
    for stem in stems:
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        names.append(name)
    return names


def refuse_replacing_user_files(results: list[Path], videos: list[Path]) -> None:
    """ValueError if one of ``predict``'s results files or video outputs exists and is not an
    earlier output of ``predict``: they go straight into ``--out``, which may be the input
    folder, where a user's own ``clip.mp4`` can sit beside the ``clip.mkv`` being annotated.
    (``overlays/`` is predict's own folder: its files are replaced, as a rerun needs.)"""
    for out, ours in [
        *((p, PredictionFiles.written_by_predict) for p in results),
        *((p, written_by_predict) for p in videos),
    ]:
        if (out.exists() or out.is_symlink()) and not ours(out):
            raise ValueError(
                f"{out} exists and was not written by maskrcnn predict, so it is not replaced; "
                "choose another --out folder"
            )
