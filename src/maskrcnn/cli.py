"""Command line: ``maskrcnn predict | evaluate | train | demo | convert | download | export``."""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports torch only once a command runs, so --help stays fast
    from .model.mask_rcnn import MaskRCNN
    from .onnx_model import OnnxModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

log = logging.getLogger("maskrcnn")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images and videos, by extension, sorted) and glob patterns -> file
    paths, in order, unique. The one expansion of ``predict``'s inputs: images and videos are
    told apart afterwards, whichever way they were named.

    Returns:
        The paths, and one message (logged too) for each input skipped: a name that matches
        nothing, or an entry that is not a regular file (a FIFO would block the reader forever).
    """
    from .video import is_video

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


def refuse_overwriting_inputs(inputs: list[Path], outputs: list[Path]) -> None:
    """ValueError if writing any of ``outputs`` would replace one of ``inputs``.

    Compared by resolved path and, for files that exist, by device and inode, so links and
    case-insensitive file systems cannot slip an input through.
    """
    resolved = {p.resolve(): p for p in inputs}
    inodes = {}
    for p in inputs:
        with contextlib.suppress(OSError):
            st = p.stat()
            inodes[(st.st_dev, st.st_ino)] = p
    for out in outputs:
        hit = resolved.get(out.resolve())
        if hit is None and out.exists():
            st = out.stat()
            hit = inodes.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise ValueError(f"writing {out} would overwrite the input {hit}; choose another --out folder")


def refuse_replacing_user_files(results: list[Path], videos: list[Path]) -> None:
    """ValueError if one of ``predict``'s results files or video outputs exists and is not an
    earlier output of ``predict``: they go straight into ``--out``, which may be the input
    folder, where a user's own ``clip.mp4`` can sit beside the ``clip.mkv`` being annotated.
    (``overlays/`` is predict's own folder: its files are replaced, as a rerun needs.)"""
    from .engine.inference import PredictionFiles
    from .video import written_by_predict

    for out, ours in [*((p, PredictionFiles.written_by_predict) for p in results), *((p, written_by_predict) for p in videos)]:
        if (out.exists() or out.is_symlink()) and not ours(out):
            raise ValueError(f"{out} exists and was not written by maskrcnn predict, so it is not replaced; "
                             "choose another --out folder")


def cmd_predict(args: argparse.Namespace) -> int:
    """Images -> overlays and COCO results; videos, animated GIFs, streams, cameras -> an
    annotated video and JSON Lines each. Exit 1 when an input was skipped or failed."""
    from .video import is_animated_gif, is_stream, is_video

    streams = [i for i in args.inputs if is_stream(i)]
    paths, failed = expand_inputs([i for i in args.inputs if not is_stream(i)])
    videos = [p for p in paths if is_video(str(p)) or is_animated_gif(p)]
    images = [p for p in paths if p not in set(videos)]
    if not (images or videos or streams):
        print(f"error: no images or videos found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    if args.tile_whole and (videos or streams):
        args.parser.error("--tile-whole applies to images only, not to videos, streams or cameras")
    from .engine.inference import PredictionFiles, coco_image_ids
    from .predictor import check_score_thresh
    from .video import output_name

    check_score_thresh(args.score_thresh)
    out = Path(args.out)
    overlays = [out / "overlays" / f"{n}.png" for n in unique_names([p.stem for p in images])]
    sources = [*streams, *map(str, videos)]
    names = unique_names([output_name(s) for s in sources], taken={"predictions"})  # predictions.jsonl is the images'
    video_files = [out / f"{n}{ext}" for n in names for ext in (".mp4", ".jsonl")]
    results = PredictionFiles(out).paths() if images else []
    # Before any work: no output replaces an input, or a file that predict did not write.
    refuse_overwriting_inputs(paths, [*overlays, *results, *video_files])
    refuse_replacing_user_files(results, video_files)
    # Images missing from the --coco file get ids past its largest, never one of its ids.
    gt_ids = coco_image_ids(images, args.coco) if args.coco else ([None] * len(images), 1)
    from .checkpoint import load

    model = load(args.weights, device=args.device)
    videos_failed = predict_videos(args, model, sources, names) if sources else 0
    failed += predict_images(args, model, images, overlays, gt_ids) if images else []
    if failed:
        print(f"{len(failed)} input(s) could not be processed:", *failed, sep="\n  ", file=sys.stderr)
    return 1 if failed or videos_failed else 0


def predict_images(args: argparse.Namespace, model: "MaskRCNN | OnnxModel", paths: list[Path], overlays: list[Path],
                   gt_ids: tuple[list[int | None], int]) -> list[str]:
    """Each image -> ``overlays[i]``, and ``--out``'s results files; the messages of those that
    failed. ``gt_ids``: each image's ``--coco`` id or None, and the first id free for the others."""
    from tqdm import tqdm

    from .data.images import MAX_PIXELS
    from .engine.inference import PredictionFiles, label_to_category
    from .predictor import iter_predict

    out = Path(args.out)
    ids, first_free = gt_ids
    table = label_to_category(model)
    results, failed = PredictionFiles(out), []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=args.quiet)
    stream = iter_predict(model, paths, batch_size=args.batch_size, score_thresh=args.score_thresh,
                          max_pixels=args.max_pixels or MAX_PIXELS, precision=args.precision,
                          tile=args.tile, tile_overlap=args.tile_overlap, tile_whole=args.tile_whole, progress=not args.quiet)
    with results:
        for i, result in enumerate(stream):
            bar.update(1)
            if result.error is not None:  # logged as it happened; listed again at the end
                failed.append(result.error)
                continue
            image_id = ids[i] if ids[i] is not None else first_free + i
            result.save(overlays[i])
            results.add(image_id, str(paths[i]), result, result.to_coco(image_id, table))
        bar.close()
    print(f"{results.images} images, {results.detections} detections -> {out}/ "
          "(overlays/, predictions.json, predictions.jsonl, images.json)")
    return failed


def predict_videos(args: argparse.Namespace, model: "MaskRCNN | OnnxModel", sources: list[str], names: list[str]) -> int:
    """Each video, stream or camera -> ``--out/<name>.mp4`` and ``<name>.jsonl``. Returns how
    many failed or ended before their header's frame count, each told in one line as it happens."""
    from .engine.inference import label_to_category
    from .video import predict_video

    table = label_to_category(model)
    failed = 0
    for source, name in zip(sources, names):
        try:
            done = predict_video(model, source, args.out, stride=args.stride, batch_size=args.batch_size,
                                 score_thresh=args.score_thresh, precision=args.precision, tile=args.tile,
                                 tile_overlap=args.tile_overlap, category_ids=table, progress=not args.quiet, name=name)
        except ValueError as e:  # cannot open, no video stream, no frame, PyAV missing: one line, go on
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if done.problem is not None:  # truncated or broken off: what was decoded is kept, exit 1
            print(f"warning: {source}: {done.problem}", file=sys.stderr)
            failed += 1
        print(f"{source}: {done.frames_processed} of {done.frames_read} frames, {done.detections} detections -> "
              f"{done.video}, {done.jsonl}")
    return failed


# How ``evaluate``'s files begin (results.json: a compact COCO results list, metrics.json:
# indented metrics), or the whole file when empty: an earlier evaluation's output is replaced,
# a user's own file of that name is not.
_EVALUATE_OPENINGS = {"results.json": (b'[{"image_id": ', b"[]"), "metrics.json": (b'{\n "bbox": {', None)}


def check_evaluate_out(out: Path, inputs: list[Path]) -> None:
    """ValueError before any work if ``evaluate`` writing ``out/results.json`` and
    ``out/metrics.json`` would replace an input (``--data``, ``--weights``) or a file that an
    earlier ``evaluate`` did not write, or if ``out`` cannot be written (found only after an
    evaluation that may take hours, otherwise)."""
    outputs = [out / name for name in _EVALUATE_OPENINGS]
    refuse_overwriting_inputs(inputs, outputs)
    for path in outputs:
        if not (path.exists() or path.is_symlink()):
            continue
        prefix, empty = _EVALUATE_OPENINGS[path.name]
        try:
            with open(path, "rb") as f:
                head = f.read(len(prefix) + 1)
        except OSError:
            head = b""
        if not (head.startswith(prefix) or head == empty):
            raise ValueError(f"{path} exists and was not written by maskrcnn evaluate, so it is not replaced; "
                             "choose another --out folder")
    # Writable, told now rather than after the work, and nothing created on the way (the folder
    # is made when the results are written): the nearest existing folder must take new files.
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} cannot be written (read-only or no permission)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Exit 0; 1 when ``--skip-bad-images`` left images out; 2 on bad input (nothing evaluated)."""
    from .checkpoint import load
    from .data.coco import CocoDataset, describe_problems
    from .data.errors import DatasetError
    from .engine.evaluate import coco_evaluate, format_metrics
    from .engine.inference import coco_results, label_to_category
    from .results import write_coco_results, write_json

    # The ground truth through the training parser; every image file checked (headers only)
    # before the model is loaded: a missing or mis-sized image would score its ground truth
    # against no detections, or against masks drawn at the wrong size.
    if args.out:  # before any work: never an input, never a user's own file, and writable
        check_evaluate_out(Path(args.out), [Path(args.data), Path(args.weights)])
    gt = CocoDataset(args.data, args.images, allow_outside_root=args.allow_outside_root)
    bad = gt.bad_images(decode=False)
    if len(bad) == len(gt):
        raise DatasetError(describe_problems(args.data, len(gt), bad) + f"\n  is --images {args.images} the right folder?")
    if bad and not args.skip_bad_images:
        raise DatasetError(describe_problems(args.data, len(gt), bad) + "\n  (--skip-bad-images leaves them out of "
                           "both the ground truth and the detections)")
    model = load(args.weights, device=args.device)
    model_ids, gt_ids = set(label_to_category(model)[1:]), {a.category_id for a in gt.file.annotations}
    if not model_ids & gt_ids:
        raise DatasetError(f"{args.data}: none of its category ids {sorted(gt_ids)[:10]} is one the model predicts "
                           f"{sorted(model_ids)[:10]}; every AP would be 0")
    skipped: list[int] = []
    keep = [i for i in gt.image_ids if i not in bad]
    entries = coco_results(model, gt.coco, args.images, batch_size=args.batch_size, progress=not args.quiet,
                           image_ids=keep, allow_outside_root=args.allow_outside_root,
                           tile=args.tile, tile_overlap=args.tile_overlap, tile_whole=args.tile_whole,
                           skipped=skipped if args.skip_bad_images else None)
    excluded = [*bad, *skipped]
    keep = [i for i in keep if i not in skipped]
    if not keep:
        raise DatasetError(f"{args.data}: no image could be read; nothing to evaluate")
    iou_types = ("bbox", "segm") if model.config.masks else ("bbox",)
    metrics = coco_evaluate(gt.coco, entries, iou_types=iou_types, image_ids=keep)
    print(format_metrics(metrics))
    if excluded:
        names = [gt.file.images[i].file_name for i in excluded]
        metrics["excluded_images"] = names
        shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
        print(f"{len(excluded)} of {len(gt)} images left out of both the ground truth and the detections: {shown}",
              file=sys.stderr)
    if args.out:
        out = Path(args.out)
        write_coco_results(entries, out / "results.json")
        write_json(metrics, out / "metrics.json", indent=1)
        print(f"results.json and metrics.json -> {out}/")
    return 1 if excluded else 0


def cmd_download(args: argparse.Namespace) -> int:
    from .download import DownloadError, download, published_url

    url = args.name if "://" in args.name else published_url(args.name)
    try:
        path = download(url, args.dir, sha256=args.sha256, progress=not args.quiet)
    except DownloadError as e:  # offline, HTTP error, bad hash: one line, not a traceback
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .data import dsb_to_coco, via_to_coco

    if args.format == "via":
        if not args.images:
            print("error: convert via needs --images (the folder of the VIA file's images)", file=sys.stderr)
            return 2
        coco = via_to_coco(args.source, args.images, args.out, category_name=args.category or "object",
                           category_attribute=args.attribute, filename_map=args.prefix,
                           allow_outside_root=args.allow_outside_root)
    else:
        coco = dsb_to_coco(args.source, args.out, category_name=args.category or "nucleus")
    print(f"{len(coco['images'])} images, {len(coco['annotations'])} instances, "
          f"{len(coco['categories'])} categories -> {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.train import main as train_main

    return train_main(args.config, args.overrides, resume=args.resume)


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo import run_demo

    return run_demo(args.out, args.overrides, minutes=args.minutes)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_OPSET, export

    if args.int8 or args.calib:
        from .quantize import Int8Options, export_int8

        if not (args.int8 and args.calib):
            raise ValueError("--int8 and --calib DIR go together: INT8 export calibrates on the images of DIR")
        options = Int8Options(Path(args.calib), args.calib_images)
        path = export_int8(args.weights, args.out, options, args.opset or DEFAULT_OPSET, overwrite=args.overwrite)
    else:
        path = export(args.weights, args.out, args.opset or DEFAULT_OPSET, overwrite=args.overwrite)
    print(f"{path} ({path.stat().st_size / 1e6:.0f} MB): run it with maskrcnn predict --weights {path} ...")
    return 0


def tile_size(text: str) -> int:
    """``--tile``: a whole number of pixels that ``tiling.check_tiling`` accepts."""
    from .tiling import check_tiling

    value = positive_int(text)
    try:
        check_tiling(value, 0.0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("tile ", "", 1)) from None
    return value


def tile_overlap(text: str) -> float:
    """``--tile-overlap``: a number that ``tiling.check_tiling`` accepts (the API's one rule)."""
    from .tiling import MIN_TILE, check_tiling

    try:
        value = float(text)
        check_tiling(MIN_TILE, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("tile_overlap ", "")) from None
    return value


def check_tile_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An argparse error (exit 2) for ``--tile-whole`` without ``--tile``, which would do nothing."""
    if getattr(args, "tile_whole", False) and args.tile is None:
        parser.error("--tile-whole needs --tile (it adds a whole-image pass to a tiled run)")


def add_tile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=tile_size, default=None,
                   help="cut each image into TILE x TILE tiles at native resolution and merge the detections "
                        "(very large images; the pixel limit becomes 1,000,000,000)")
    p.add_argument("--tile-overlap", type=tile_overlap, default=0.2,
                   help="fraction of a tile that neighbours share, at most 0.75 (default 0.2)")
    p.add_argument("--tile-whole", action="store_true",
                   help="with --tile, one more pass over the whole image shrunk to a tile, for objects larger than a tile")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskrcnn", description="Mask R-CNN instance segmentation in pure PyTorch")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("predict", help="detect objects in images; write overlays and COCO results JSON")
    q.add_argument("inputs", nargs="+", help="image files, folders or glob patterns; video files, stream URLs, /dev/videoN")
    q.add_argument("--weights", required=True, help="our checkpoint or a torchvision Mask R-CNN .pth")
    q.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    q.add_argument("--score-thresh", type=float, default=None, help="keep detections scoring at least this")
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    q.add_argument("--batch-size", type=positive_int, default=1,
                   help="images per forward pass, at most: only images of the same padded size share one")
    q.add_argument("--coco", default=None, help="COCO JSON whose image ids to use in predictions.json")
    q.add_argument("--max-pixels", type=positive_int, default=None,
                   help="refuse images with more pixels than this (default 178956970, Pillow's own limit)")
    q.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                   help="fp32 (default, torchvision's numbers); auto: bf16 where the CPU or GPU computes it natively")
    add_tile_options(q)
    q.add_argument("--stride", type=positive_int, default=1, help="videos: process every K-th frame (default 1)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_predict, parser=q)

    e = sub.add_parser("evaluate", help="COCO box and mask AP of a model on an annotated image set")
    e.add_argument("--weights", required=True)
    e.add_argument("--data", required=True, help="COCO instances JSON")
    e.add_argument("--images", required=True, help="folder with the JSON's images")
    e.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=positive_int, default=1)
    add_tile_options(e)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--skip-bad-images", action="store_true",
                   help="leave missing, unreadable or wrongly sized images out of both the ground truth and the "
                        "detections (exit code 1) instead of stopping with an error")
    e.add_argument("--allow-outside-root", action="store_true",
                   help="let file names in --data be absolute or lead out of --images ('../x.jpg')")
    e.set_defaults(func=cmd_evaluate, parser=e)

    t = sub.add_parser("train", help="train on COCO-format data: maskrcnn train CONFIG.yaml key=value ...")
    t.add_argument("config", help="YAML training config, or a built-in one: demo_shapes, kudzu, coco_r50")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver.epochs=12")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="generate the built-in synthetic dataset, train, evaluate, predict")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--minutes", type=float, default=None, help="training time budget (default from the demo config)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", help="VIA polygons or a DSB mask folder -> COCO instances JSON")
    c.add_argument("format", choices=["via", "dsb"], help="via: VGG Image Annotator JSON; dsb: ID/images, ID/masks folders")
    c.add_argument("source", help="the VIA JSON file, or the DSB root folder")
    c.add_argument("--out", required=True, help="COCO JSON to write")
    c.add_argument("--images", default=None, help="via: folder holding the images named in the file")
    c.add_argument("--prefix", default=None, help="via: prefix added to the file names inside the VIA file")
    c.add_argument("--category", default=None, help="category name (via: object, dsb: nucleus)")
    c.add_argument("--attribute", default=None, help="via: region attribute holding the category name")
    c.add_argument("--allow-outside-root", action="store_true",
                   help="via: let file names be absolute or lead out of --images ('../x.jpg')")
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser("export", help="write a model as one ONNX file (boxes, scores, labels, masks) for ONNX Runtime")
    x.add_argument("--weights", required=True, help="our checkpoint, a torchvision Mask R-CNN .pth or a Detectron2 .pkl")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=positive_int, default=None, help="ONNX opset, 11 to 20 (default 17; at least 16 for aligned RoIAlign)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not an earlier maskrcnn export (never the --weights file)")
    x.add_argument("--int8", action="store_true", help="quantise the convolutions to INT8 (ONNX Runtime static quantisation; needs --calib)")
    x.add_argument("--calib", default=None, help="with --int8: a folder of images like those the model will see, to calibrate on")
    x.add_argument("--calib-images", type=positive_int, default=32, help="with --int8: calibrate on at most this many images of --calib")
    x.set_defaults(func=cmd_export)

    w = sub.add_parser("download", help="fetch published torchvision or Detectron2 weights into the cache (torchvision's sha256-checked)")
    w.add_argument("name", nargs="?", default="maskrcnn_resnet50_fpn_coco", help="a known name or a URL")
    w.add_argument("--dir", default=None, help="cache folder (default $MASKRCNN_HOME or ~/.cache/maskrcnn)")
    w.add_argument("--sha256", default=None, help="expected digest (default: the hash prefix in the file name)")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=cmd_download)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "parser"):
        check_tile_options(args.parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # our errors (config, checkpoint, data, download) are ValueErrors
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
