"""Command line: ``maskrcnn predict | evaluate | train | demo | convert | download | export | push | serve``."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports torch only once a command runs, so --help stays fast
    from .inference.options import PredictOptions

log = logging.getLogger("maskrcnn")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


# PredictOptions' messages name its fields; the command line names flags. (The tile sizes and
# counts are checked by the flags' argparse types, with the same rules.)
_FLAG_NAMES = {"tile_whole needs tile": "--tile-whole needs --tile"}


def options_from_args(args: argparse.Namespace) -> PredictOptions:
    """``predict`` and ``evaluate``'s flags -> the one validated ``PredictOptions``. A flag that
    needs another is a usage error (argparse's, exit 2); a bad value a one-line ValueError
    (``main`` prints it, exit 2)."""
    from .inference.options import PredictOptions

    if getattr(args, "tile_overlap", None) is not None and getattr(args, "tile", None) is None:
        args.parser.error("--tile-overlap needs --tile")
    fields = {
        k: getattr(args, k)
        for k in ("score_thresh", "batch_size", "max_pixels", "precision", "tile", "tile_overlap", "tile_whole")
        if getattr(args, k, None) is not None
    }
    try:
        return PredictOptions(**fields, progress=not args.quiet)
    except ValueError as e:  # the API's message, in the flags' names
        for api, flag in _FLAG_NAMES.items():
            if api in str(e):
                args.parser.error(str(e).replace(api, flag))
        raise


def cmd_predict(args: argparse.Namespace) -> int:
    """Images -> overlays and COCO results; videos, animated GIFs, streams, cameras -> an
    annotated video and JSON Lines each. Exit 1 when an input was skipped or failed."""
    from .commands.predict import FileOutputs, UsageError, predict_files

    outputs = FileOutputs(
        coco=args.coco,
        stride=args.stride,
        export=tuple(args.export or ()),
        labels=args.labels,
        geojson=args.geojson,
        polygons=args.polygons,
        polygon_tolerance=args.polygon_tolerance,
        track=args.track,
        count_line=args.count_line,
        quiet=args.quiet,
    )
    try:
        done = predict_files(
            args.weights,
            args.inputs,
            args.out,
            options_from_args(args),
            outputs,
            device=args.device,
            input_size=args.input_size,
            max_detections=args.max_detections,
        )
    except UsageError as e:
        args.parser.error(str(e))
    if done.failed:
        print(f"{len(done.failed)} input(s) could not be processed:", *done.failed, sep="\n  ", file=sys.stderr)
    return 1 if done.failed or done.videos_failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Exit 0; 1 when ``--skip-bad-images`` left images out; 2 on bad input (nothing evaluated)."""
    from .commands.evaluate import evaluate_files

    metrics = evaluate_files(
        args.weights,
        args.data,
        args.images,
        options_from_args(args),
        out=args.out,
        device=args.device,
        skip_bad_images=args.skip_bad_images,
        check_names=not args.ignore_class_names,
        allow_outside_root=args.allow_outside_root,
        report_score=args.report_score,
        worst=args.worst,
    )
    return 1 if metrics.get("excluded_images") else 0


def cmd_download(args: argparse.Namespace) -> int:
    from .weights.download import DownloadError, download, published_url

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
        coco = via_to_coco(
            args.source,
            args.images,
            args.out,
            category_name=args.category or "object",
            category_attribute=args.attribute,
            filename_map=args.prefix,
            allow_outside_root=args.allow_outside_root,
        )
    elif args.format == "dsb":
        coco = dsb_to_coco(args.source, args.out, category_name=args.category or "nucleus")
    else:
        coco = convert_tool(args)
    skipped = coco.get("info", {}).get("not_converted", [])
    print(
        f"{len(coco['images'])} images, {len(coco['annotations'])} instances, "
        f"{len(coco['categories'])} categories -> {args.out}"
        + (f"; {len(skipped)} not converted (named above, all in its info.not_converted)" if skipped else "")
    )
    return 0


def convert_tool(args: argparse.Namespace) -> dict:
    """``convert labelme|cvat|labelstudio|yolo``: the annotation tools' readers (``data.formats``)."""
    from .data import formats
    from .data.formats.common import read_classes

    if args.format in ("cvat", "labelstudio") and not args.images:
        raise ValueError(f"convert {args.format} needs --images (the folder of the export's images)")
    classes = read_classes(args.classes) if args.classes else None
    if args.format == "labelme":
        return formats.labelme_to_coco(args.source, args.out, args.images, args.allow_outside_root, classes)
    if args.format == "cvat":
        return formats.cvat_to_coco(args.source, args.images, args.out, args.allow_outside_root, classes)
    if args.format == "labelstudio":
        return formats.labelstudio_to_coco(
            args.source, args.images, args.out, args.image_key, args.predictions, classes
        )
    coco, root = formats.yolo_to_coco(args.source, args.out, args.split, args.allow_outside_root, classes)
    print(f"file names are relative to {root}: train with data.train_images={root}")
    return coco


def cmd_train(args: argparse.Namespace) -> int:
    from .train import distributed
    from .train.trainer import main as train_main

    code = train_main(args.config, args.overrides, resume=args.resume)
    if distributed.launched():  # torchrun: without the teardown that can abort a finished run
        distributed.exit_process(code)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from .train.demo import run_demo

    return run_demo(args.out, args.overrides, minutes=args.minutes)


def cmd_export(args: argparse.Namespace) -> int:
    from .weights.export import DEFAULT_OPSET, export

    if args.int8 or args.calib:
        from pathlib import Path

        from .weights.quantize import Int8Options, export_int8

        if not (args.int8 and args.calib):
            raise ValueError("--int8 and --calib DIR go together: INT8 export calibrates on the images of DIR")
        if Path(args.out).suffix.lower() == ".xml":
            raise ValueError("--int8 writes an ONNX file (ONNX Runtime's quantisation): name --out model.onnx")
        options = Int8Options(Path(args.calib), args.calib_images)
        path = export_int8(args.weights, args.out, options, args.opset or DEFAULT_OPSET, overwrite=args.overwrite)
    else:
        path = export(args.weights, args.out, args.opset or DEFAULT_OPSET, overwrite=args.overwrite)
    files = [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]  # an IR's weights: the .bin
    size = sum(f.stat().st_size for f in files)
    print(f"{path} ({size / 1e6:.0f} MB): run it with maskrcnn predict --weights {path} ...")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .weights.share import PushOptions, push

    url = push(args.weights, args.repo, PushOptions(private=args.private, metrics=args.metrics, message=args.message))
    print(f'{args.weights} -> {url}: load it with maskrcnn.load("hf://{args.repo}")')
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import ServeOptions, run

    run(
        args.weights,
        ServeOptions(
            host=args.host,
            port=args.port,
            device=args.device,
            max_batch=args.max_batch,
            max_upload_mb=args.max_upload_mb,
            read_timeout_s=args.read_timeout,
            max_pixels=args.max_pixels,
            max_queue=args.max_queue,
            precision=args.precision,
        ),
    )
    return 0


def tile_size(text: str) -> int:
    """``--tile``: a whole number of pixels that ``tiling.check_tiling`` accepts."""
    from .inference.tiling import check_tiling

    value = positive_int(text)
    try:
        check_tiling(value, 0.0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("tile ", "", 1)) from None
    return value


def tile_overlap(text: str) -> float:
    """``--tile-overlap``: a number that ``tiling.check_tiling`` accepts (the API's one rule)."""
    from .inference.tiling import MIN_TILE, check_tiling

    try:
        value = float(text)
        check_tiling(MIN_TILE, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("tile_overlap ", "")) from None
    return value


def add_tile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tile",
        type=tile_size,
        default=None,
        help="cut each image into TILE x TILE tiles at native resolution and merge the detections "
        "(very large images; the pixel limit becomes 1,000,000,000)",
    )
    p.add_argument(
        "--tile-overlap",
        type=tile_overlap,
        default=None,  # None: not given (alone it would be ignored, so it is refused); 0.2 then
        help="with --tile, the fraction of a tile that neighbours share, at most 0.75 (default 0.2)",
    )
    p.add_argument(
        "--tile-whole",
        action="store_true",
        help="with --tile, one more pass over the whole image shrunk to a tile, for objects larger than a tile",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskrcnn", description="Mask R-CNN instance segmentation in pure PyTorch")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("predict", help="detect objects in images; write overlays and COCO results JSON")
    q.add_argument(
        "inputs", nargs="+", help="image files, folders or glob patterns; video files, stream URLs, /dev/videoN"
    )
    q.add_argument("--weights", required=True, help="our checkpoint, a torchvision Mask R-CNN .pth, or hf://owner/name")
    q.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    q.add_argument("--score-thresh", type=float, default=None, help="keep detections scoring at least this")
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    q.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="images per forward pass, at most: only images of the same padded size share one",
    )
    q.add_argument("--coco", default=None, help="COCO JSON whose image ids to use in predictions.json")
    q.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="refuse images with more pixels than this (default 178956970, Pillow's own limit)",
    )
    q.add_argument(
        "--precision",
        default="fp32",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="fp32 (default, torchvision's numbers); auto: bf16 where the CPU or GPU computes it natively",
    )
    add_tile_options(q)
    q.add_argument(
        "--labels",
        action="store_true",
        help="images: OUT/labels/<image>.tif instance label images and OUT/measurements.csv (microscopy)",
    )
    q.add_argument(
        "--geojson",
        action="store_true",
        help="images: OUT/<image>.geojson, one polygon per object, in the CRS of a GeoTIFF, else in pixels",
    )
    q.add_argument("--polygons", action="store_true", help="images: OUT/polygons.json, COCO results with polygon masks")
    q.add_argument(
        "--polygon-tolerance",
        type=float,
        default=None,
        metavar="PX",
        help="--geojson, --polygons: simplify outlines moving no vertex more than PX pixels (default 0.5)",
    )
    q.add_argument(
        "--export",
        action="append",
        choices=["labelme", "yolo", "cvat", "labelstudio"],
        default=None,
        help="images: also write the masks as polygons that the tool opens as pre-annotations, in "
        "--out/labelme/, --out/yolo/, --out/cvat/ or --out/labelstudio/ (repeat for several)",
    )
    q.add_argument("--stride", type=positive_int, default=1, help="videos: process every K-th frame (default 1)")
    q.add_argument(
        "--input-size",
        type=positive_int,
        default=None,
        metavar="PIXELS",
        help="resize to this short side instead of the model's (e.g. 512: faster, less accurate)",
    )
    q.add_argument(
        "--max-detections",
        type=positive_int,
        default=None,
        metavar="N",
        help="keep at most N detections per image (default the model's, 100): fewer masks to compute",
    )
    q.add_argument(
        "--track",
        action="store_true",
        help="videos: follow objects across frames (track_id in the JSON Lines, <name>.tracks.json)",
    )
    q.add_argument(
        "--count-line",
        default=None,
        metavar="X1,Y1,X2,Y2",
        help="videos: count tracks crossing this segment, per direction (implies --track)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_predict, parser=q)

    e = sub.add_parser("evaluate", help="COCO box and mask AP of a model on an annotated image set")
    e.add_argument("--weights", required=True)
    e.add_argument("--data", required=True, help="COCO instances JSON")
    e.add_argument("--images", required=True, help="folder with the JSON's images")
    e.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    e.add_argument(
        "--ignore-class-names",
        action="store_true",
        help="evaluate even where a category id names another class in --data than in the model",
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=positive_int, default=1)
    add_tile_options(e)
    e.add_argument("--quiet", action="store_true")
    e.add_argument(
        "--report-score",
        type=float,
        default=0.5,
        help="score threshold of the precision / recall / F1 table and the confusion matrix (default 0.5)",
    )
    e.add_argument(
        "--worst",
        type=non_negative_int,
        default=6,
        help="with --out: draw this many images with the most missed or false objects (default 6; 0: none)",
    )
    e.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave missing, unreadable or wrongly sized images out of both the ground truth and the "
        "detections (exit code 1) instead of stopping with an error",
    )
    e.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="let file names in --data be absolute or lead out of --images ('../x.jpg')",
    )
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

    c = sub.add_parser(
        "convert",
        help="annotation tools' files (VIA, LabelMe, CVAT, Label Studio, YOLO) or a DSB mask folder -> COCO instances JSON",
    )
    c.add_argument(
        "format",
        choices=["via", "dsb", "labelme", "cvat", "labelstudio", "yolo"],
        help="via: VGG Image Annotator JSON; dsb: ID/images, ID/masks folders; labelme: folder of LabelMe JSON; "
        "cvat: CVAT for images 1.1 XML; labelstudio: Label Studio JSON export; yolo: YOLO segmentation data.yaml",
    )
    c.add_argument(
        "source",
        help="the VIA, CVAT or Label Studio file, the LabelMe folder (or file), the YOLO data.yaml, or the DSB root folder",
    )
    c.add_argument("--out", required=True, help="COCO JSON to write")
    c.add_argument(
        "--images",
        default=None,
        help="via, cvat: folder holding the images named in the file; labelstudio: the local-files "
        "document root or a folder below it on the images' paths; "
        "labelme: folder file names are relative to (default: the LabelMe folder)",
    )
    c.add_argument("--split", default="train", help="yolo: the data.yaml split to convert (default train)")
    c.add_argument(
        "--image-key", default="image", help="labelstudio: the task data key of the image URL (default image)"
    )
    c.add_argument(
        "--predictions",
        action="store_true",
        help="labelstudio: convert a task that has no annotation from its predictions (pre-annotations "
        "nobody accepted); without it such tasks are named and left out",
    )
    c.add_argument(
        "--classes",
        default=None,
        help="labelme, cvat, labelstudio, yolo: the classes, category ids 1.. in this order: 'a,b,c' or a file "
        "of one name a line (predict --export writes <tool>/classes.txt); a shape of another label is named "
        "as not converted. Default: LabelMe, Label Studio the labels in order of first appearance; CVAT the "
        "file's <labels>; YOLO its names",
    )
    c.add_argument("--prefix", default=None, help="via: prefix added to the file names inside the VIA file")
    c.add_argument("--category", default=None, help="category name (via: object, dsb: nucleus)")
    c.add_argument("--attribute", default=None, help="via: region attribute holding the category name")
    c.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="let file names be absolute or lead out of --images ('../x.jpg')",
    )
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser(
        "export",
        help="write a model as one ONNX file (boxes, scores, labels, masks) for ONNX Runtime, or as OpenVINO IR (.xml)",
    )
    x.add_argument(
        "--weights", required=True, help="our checkpoint, a torchvision Mask R-CNN .pth or a Detectron2 .pkl"
    )
    x.add_argument(
        "--out", required=True, help="the .onnx file to write, or model.xml for OpenVINO (model.bin beside it)"
    )
    x.add_argument(
        "--opset",
        type=positive_int,
        default=None,
        help="ONNX opset, 11 to 20 (default 17; at least 16 for aligned RoIAlign)",
    )
    x.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file that is not an earlier maskrcnn export (never the --weights file)",
    )
    x.add_argument(
        "--int8",
        action="store_true",
        help="quantise the convolutions to INT8 (ONNX Runtime static quantisation; needs --calib)",
    )
    x.add_argument(
        "--calib", default=None, help="with --int8: a folder of images like those the model will see, to calibrate on"
    )
    x.add_argument(
        "--calib-images",
        type=positive_int,
        default=32,
        help="with --int8: calibrate on at most this many images of --calib",
    )
    x.set_defaults(func=cmd_export)

    h = sub.add_parser("push", help="upload weights to the Hugging Face Hub as safetensors, with config and model card")
    h.add_argument("weights", help="checkpoint to share (ours, torchvision's or Detectron2's)")
    h.add_argument("repo", help="Hub repository id, owner/name (created if missing)")
    h.add_argument("--private", action="store_true", help="create the repository as private")
    h.add_argument("--metrics", default=None, help="metrics.json of maskrcnn evaluate, shown in the model card")
    h.add_argument("--message", default="Upload Mask R-CNN model", help="commit message")
    h.set_defaults(func=cmd_push)

    s = sub.add_parser("serve", help="HTTP API and web page: POST /predict, GET /health, GET /model, / in a browser")
    s.add_argument("--weights", required=True, help="model file, or hf://owner/name on the Hugging Face Hub")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--max-batch", type=positive_int, default=4, help="requests run together at most (default 4)")
    s.add_argument(
        "--max-queue",
        type=positive_int,
        default=16,
        help="requests read and held at once (default 16); later ones wait, unread",
    )
    s.add_argument(
        "--max-upload-mb", type=positive_float, default=20.0, help="largest upload accepted, in MB (default 20)"
    )
    s.add_argument(
        "--read-timeout",
        type=positive_float,
        default=30.0,
        help="seconds an upload may send nothing before it is dropped (408; default 30)",
    )
    s.add_argument(
        "--max-pixels",
        type=positive_int,
        default=40_000_000,
        help="largest image accepted, in pixels (default 40,000,000)",
    )
    s.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"], help="as for predict")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser(
        "download",
        help="fetch published torchvision or Detectron2 weights into the cache (torchvision's sha256-checked)",
    )
    w.add_argument("name", nargs="?", default="maskrcnn_resnet50_fpn_coco", help="a known name or a URL")
    w.add_argument("--dir", default=None, help="cache folder (default $MASKRCNN_HOME or ~/.cache/maskrcnn)")
    w.add_argument("--sha256", default=None, help="expected digest (default: the hash prefix in the file name)")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(func=cmd_download)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
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
