"""``model.predict``: images in whatever form a user has, ``Result`` objects out.

One loop (``predict_batches``) runs a model over images for the API, ``maskrcnn predict``,
``maskrcnn evaluate``, the demo and training validation: it reads each input when its batch
comes up, so memory holds one batch, and an input that cannot be read or that the model fails
on becomes a ``Result`` with ``error`` set while the others go on (validation, which also
computes losses, raises instead).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from . import tiling
from ..config import check_probability
from ..data.images import MAX_PIXELS, TILED_MAX_PIXELS, decode_in_place, load_rgb, normalized_rgb, open_image
from ..data.normalize import check_percentiles
from ..model.mask_rcnn import MaskRCNN
from ..weights.onnx_model import OnnxModel
from ..precision import autocast
from ..precision import resolve as resolve_precision
from .results import DISPLAY_SIZE, Result
from ..structures import Targets

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
_Loaded = tuple[str, np.ndarray, Optional[str]]  # an input read: (name, (H, W, 3) uint8 RGB, path)


def as_rgb(image: ImageLike, max_pixels: int | None = MAX_PIXELS,
           percentiles: tuple[float, float] | None = None) -> tuple[np.ndarray, str | None]:
    """Any supported image -> ((H, W, 3) uint8 RGB array, source path or None).

    Paths are decoded with EXIF orientation (refused above ``max_pixels``); PIL images (EXIF
    orientation applied) and arrays go through ``data.images.to_rgb``, the package's one rule
    for modes and bit depths (16-bit data is divided by 257, floats in 0..1 scaled by 255);
    tensors are (3, H, W) float in 0..1. With ``percentiles`` (the model's
    ``transform.percentiles``) the values of a path, PIL image or array are stretched by its
    own percentiles instead (``data.normalize``), as training read its images; a tensor is
    taken as model input already read that way (training's validation passes the dataset's).

    Raises:
        ValueError (``DatasetError`` for files): an unreadable file, a wrong shape, no pixels.
        TypeError: an unsupported input type.
    """
    if isinstance(image, (str, Path)):
        return load_rgb(image, max_pixels, percentiles), str(image)
    if isinstance(image, Image.Image):
        return normalized_rgb(ImageOps.exif_transpose(image), percentiles), None
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"tensor images must be (3, H, W) floats in 0..1 with H, W > 0, got shape {tuple(image.shape)}")
        return (image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()), None
    if isinstance(image, np.ndarray):
        return normalized_rgb(image, percentiles), None
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a path, PIL image, array or tensor")


def _as_tensor(array: np.ndarray) -> Tensor:
    """``torch.from_numpy`` without torch's "not writable" UserWarning for a read-only array
    (``np.asarray(pil_image)``, the most common input): the tensor is only read, never written."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def check_score_thresh(value: float | None) -> float | None:
    """``value`` if None or a probability in [0, 1]; otherwise a one-line ValueError."""
    return check_probability("score threshold", value)


def model_precision(model: MaskRCNN | OnnxModel, precision: str) -> str:
    """The precision ``model`` runs at (``precision.resolve``). An ONNX model computes float32
    only: "auto" means fp32 there, and bf16 or fp16 are refused rather than silently ignored."""
    if isinstance(model, OnnxModel):
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision {precision}: an ONNX model runs in float32 on ONNX Runtime; "
                             "bf16 and fp16 apply to PyTorch checkpoints (use fp32 or auto)")
        if precision not in ("auto", "fp32", ""):
            resolve_precision(precision, "cpu")  # the one message for an unknown name
        return "fp32"
    return resolve_precision(precision, model.device)


def batch_groups(model: MaskRCNN | OnnxModel, sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of the images (``(H, W)`` each) that go through the model together: those whose
    ``Preprocessor.batch_key`` agrees, so an image's detections never depend on what it is
    batched with (torchvision pads every batch to its largest image and lets that change them;
    the ONNX path never batches). Groups in order of their first image."""
    preprocess = getattr(model, "preprocess", None)
    if preprocess is None or len(sizes) < 2:  # e.g. a stand-in model in tests: one batch
        return [list(range(len(sizes)))] if sizes else []
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(preprocess.batch_key(int(h), int(w)), []).append(i)
    return list(groups.values())


def _name(item: ImageLike, index: int) -> str:
    """How an input is named in messages: its path, else its position and type."""
    return str(item) if isinstance(item, (str, Path)) else f"input {index} ({type(item).__name__})"


def _failed(message: str, path: str | None) -> Result:
    log.error("%s", message)
    return Result.failed(message, path=path)


def iter_predict(
    model: MaskRCNN,
    images: Iterable[ImageLike],
    batch_size: int = 1,
    score_thresh: float | None = None,
    mask_thresh: float | None = None,
    keep_images: bool = True,
    max_pixels: int | None = MAX_PIXELS,
    precision: str = "fp32",
    tile: int | None = None,
    tile_overlap: float = 0.2,
    tile_whole: bool = False,
    progress: bool = False,
) -> Iterator[Result]:
    """Yield one ``Result`` per input, in order, as soon as its batch is done.

    Arguments as for ``predict``. An input that cannot be read, or on which the model fails
    (a failing batch is retried image by image to find it), yields ``Result.failed`` with the
    reason in ``error``, also logged; KeyboardInterrupt is never caught.
    """
    check_score_thresh(score_thresh)  # now, not at the first image
    check_probability("mask threshold", mask_thresh)
    model_precision(model, precision)
    tiling.check_options(tile, tile_overlap, tile_whole)
    return _predict(model, images, batch_size, score_thresh, mask_thresh, keep_images, max_pixels, precision,
                    raise_errors=False, tile=tile, tile_overlap=tile_overlap, tile_whole=tile_whole, progress=progress)


def _predict(
    model: MaskRCNN,
    images: Iterable[ImageLike],
    batch_size: int,
    score_thresh: float | None,
    mask_thresh: float | None,
    keep_images: bool,
    max_pixels: int | None,
    precision: str,
    raise_errors: bool,
    tile: int | None = None,
    tile_overlap: float = 0.2,
    tile_whole: bool = False,
    progress: bool = False,
) -> Iterator[Result]:
    """``iter_predict``; with ``raise_errors`` a failure raises its own exception instead."""
    if tile is not None:
        limit = TILED_MAX_PIXELS if max_pixels == MAX_PIXELS else max_pixels  # the default is raised for tiles
        for index, item in enumerate(images):
            yield _predict_tiled(model, item, index, tile, tile_overlap, tile_whole, batch_size, score_thresh,
                                 mask_thresh, keep_images, limit, precision, raise_errors, progress)
        return

    def chunks() -> Iterator[list[ImageLike]]:
        batch: list[ImageLike] = []
        for item in images:
            batch.append(item)
            if len(batch) >= max(1, batch_size):
                yield batch
                batch = []
        if batch:
            yield batch

    for results, _ in predict_batches(model, chunks(), None, score_thresh=score_thresh, mask_thresh=mask_thresh,
                                      keep_images=keep_images, max_pixels=max_pixels, precision=precision,
                                      raise_errors=raise_errors):
        yield from results


def _predict_tiled(
    model: MaskRCNN,
    item: ImageLike,
    index: int,
    tile: int,
    overlap: float,
    whole: bool,
    batch_size: int,
    score_thresh: float | None,
    mask_thresh: float | None,
    keep_images: bool,
    max_pixels: int | None,
    precision: str,
    raise_errors: bool,
    progress: bool,
) -> Result:
    """One image by tiles (``maskrcnn.inference.tiling``), its tiles batched through ``predict_batches``.

    A file is decoded by Pillow once and cut tile by tile, never converted whole; the
    ``Result`` keeps a preview of at most ``DISPLAY_SIZE`` a side for drawing.
    """
    path = str(item) if isinstance(item, (str, Path)) else None

    def run(batches: Iterable[list[np.ndarray]]) -> Iterator[list[Result]]:
        for results, _ in predict_batches(model, batches, score_thresh=score_thresh, mask_thresh=mask_thresh,
                                          keep_images=False, precision=precision, raise_errors=raise_errors):
            yield results

    def go(source: tiling.Source) -> Result:
        return tiling.predict_tiled(source, run, tile, overlap, batch_size, path=path, name=_name(item, index),
                                    preview_side=DISPLAY_SIZE if keep_images else None, whole=whole, progress=progress)

    try:
        from ..applications.geo import RasterioTiles, is_georeferenced

        percentiles = check_percentiles(model.config.transform.percentiles)
        if path is None:
            return go(tiling.ArrayTiles(as_rgb(item, max_pixels, percentiles)[0]))
        if is_georeferenced(path):  # read window by window, never whole (applications.geo)
            with RasterioTiles.open(path, max_pixels, percentiles) as source:
                return go(source)
        with open_image(path, max_pixels) as img:
            decode_in_place(img, path)  # no copy of a huge image
            return go(tiling.PillowTiles(img, percentiles))
    except (ValueError, TypeError, OSError) as e:  # DatasetError (a ValueError) names the file
        if raise_errors:
            raise
        return _failed(str(e) if path and path in str(e) else f"{_name(item, index)}: {e}", path)


def predict_batches(
    model: MaskRCNN,
    batches: Iterable[Sequence[ImageLike]],
    targets: Iterable[Sequence[Targets]] | None = None,
    *,
    score_thresh: float | None = None,
    mask_thresh: float | None = None,
    keep_images: bool = True,
    max_pixels: int | None = MAX_PIXELS,
    precision: str = "fp32",
    raise_errors: bool = False,
) -> Iterator[tuple[list[Result], dict[str, Tensor]]]:
    """The one loop that runs a model over images, batch by batch: ``predict``, ``evaluate``,
    the demo and training validation all go through it, for a ``MaskRCNN`` or an ``OnnxModel``.

    Args:
        batches: lists of inputs, one forward pass each.
        targets: ground truth for each batch (validation): the losses come from the same
            forward pass as the detections, in eval mode, so a validation loss costs nothing
            extra. With targets, any failure raises.
        Others: as for ``predict``.

    Yields:
        Per batch, one ``Result`` per input in order (a failed input: ``Result.failed``), and
        the batch's loss terms (empty without targets).
    """
    check_score_thresh(score_thresh)
    check_probability("mask threshold", mask_thresh)
    numerics = model_precision(model, precision)
    cfg = model.config
    mask_thresh = cfg.roi_heads.mask_thresh if mask_thresh is None else mask_thresh
    names = cfg.label_names()
    categories = cfg.label_categories()
    percentiles = check_percentiles(cfg.transform.percentiles)
    raise_errors = raise_errors or targets is not None

    def detect(loaded: list[_Loaded], truth: Sequence[Targets] | None) -> tuple[list[Result], dict[str, Tensor]]:
        """One forward pass; a failure on a single image becomes its failed Result."""
        try:
            with torch.inference_mode(), autocast(model.device, numerics):
                # (3, H, W) uint8 views: the model divides by 255 itself, so no float copy of
                # a 24 MP photo (288 MB) is held here.
                tensors = [_as_tensor(array).permute(2, 0, 1).to(model.device) for _, array, _ in loaded]
                out = model(tensors, None if truth is None else [t.to(model.device) for t in truth],
                            score_thresh=head_thresh)
                results = []
                for (_, array, path), det in zip(loaded, out.detections or []):
                    if score_thresh is not None:
                        det = det[det.scores >= score_thresh]
                    image = array if keep_images else None
                    results.append(Result.from_detections(det, array.shape[:2], names, mask_thresh, path=path, image=image,
                                                          paste=cfg.roi_heads.paste, category_table=categories))
                return results, out.losses
        except Exception as e:  # noqa: BLE001  one image that breaks the model must not cost the others
            if raise_errors:
                raise
            if len(loaded) > 1:
                return [r for one in loaded for r in detect([one], None)[0]], {}
            name, _, path = loaded[0]
            return [_failed(f"{name}: the model failed: {type(e).__name__}: {e}", path)], {}

    def detect_by_size(loaded: list[_Loaded]) -> list[Result]:
        """``detect`` on the images of each ``batch_groups`` group, results in input order."""
        found: list[Result | None] = [None] * len(loaded)
        for group in batch_groups(model, [array.shape[:2] for _, array, _ in loaded]):
            for i, result in zip(group, detect([loaded[i] for i in group], None)[0]):
                found[i] = result
        return found  # type: ignore[return-value]

    def process(batch: Sequence[ImageLike], start: int, truth: Sequence[Targets] | None) -> tuple[list[Result], dict[str, Tensor]]:
        slots: list[Result | _Loaded] = []
        for index, item in enumerate(batch, start):
            path = str(item) if isinstance(item, (str, Path)) else None
            try:
                array, _ = as_rgb(item, max_pixels, percentiles)
                slots.append((_name(item, index), array, path))
            except (ValueError, TypeError, OSError) as e:  # DatasetError (a ValueError) names the file
                if raise_errors:
                    raise
                slots.append(_failed(str(e) if path and path in str(e) else f"{_name(item, index)}: {e}", path))
        loaded = [s for s in slots if not isinstance(s, Result)]
        if truth is not None:  # validation: one forward pass for the losses and detections
            found, losses = detect(loaded, truth) if loaded else ([], {})
        else:
            found, losses = detect_by_size(loaded), {}
        done = iter(found)
        return [slot if isinstance(slot, Result) else next(done) for slot in slots], losses

    # A threshold below the model's lets lower-scored candidates through its NMS too; a higher
    # one filters the model's detections (>=, as documented).
    head_thresh = score_thresh if score_thresh is not None and score_thresh < cfg.roi_heads.score_thresh else None
    was_training = model.training
    model.eval()
    try:
        start = 0
        truths = iter(targets) if targets is not None else None
        for batch in batches:
            yield process(batch, start, next(truths) if truths is not None else None)
            start += len(batch)
    finally:
        model.train(was_training)


def predict(
    model: MaskRCNN,
    images: ImageLike | Iterable[ImageLike],
    batch_size: int = 1,
    score_thresh: float | None = None,
    mask_thresh: float | None = None,
    keep_images: bool = True,
    max_pixels: int | None = MAX_PIXELS,
    precision: str = "fp32",
    tile: int | None = None,
    tile_overlap: float = 0.2,
    tile_whole: bool = False,
    progress: bool = False,
) -> Result | list[Result]:
    """Run ``model`` on one image or a list of images.

    Args:
        model: a ``MaskRCNN`` (switched to eval mode for the call), or an ``OnnxModel`` (an
            exported file on ONNX Runtime, ``maskrcnn.load("model.onnx")``).
        images: a path, PIL image, array or tensor, or a list of them.
        batch_size: images read and run together, at most; only images of the same padded size
            share a forward pass (``batch_groups``), so results never depend on batching.
        score_thresh: keep detections with score >= this, a number in [0, 1] (default: the
            model's own threshold, 0.05 for torchvision's weights, so results equal
            torchvision's).
        mask_thresh: mask probability above which a pixel belongs to the object (default the
            config's, 0.5).
        keep_images: keep the pixels in each ``Result`` for ``.plot()``.
        max_pixels: image files with more pixels are refused (None: no limit; the default
            becomes ``TILED_MAX_PIXELS``, a billion, with ``tile``).
        precision: "fp32" (default: float32, torchvision's results), "auto" (bf16 where the
            device computes it natively, fp16 on older GPUs, else float32), "bf16" or "fp16"
            (CUDA); see ``maskrcnn.precision``. Boxes and scores stay float32 either way.
        tile: cut each image into ``tile`` x ``tile`` tiles at its native resolution, run
            them in batches of ``batch_size`` and merge the detections across tile borders
            (``maskrcnn.inference.tiling``: the grid and the merge rule). For images far larger than the
            model's input size; ``Result.image`` then holds a preview of at most
            ``results.DISPLAY_SIZE`` a side.
        tile_overlap: fraction of a tile that neighbouring tiles share, in [0, 0.75]
            (``tiling.MAX_TILE_OVERLAP``).
        tile_whole: with ``tile``, one more pass over the whole image shrunk to a tile, for
            objects larger than a tile (refused without ``tile``).
        progress: with ``tile``, a progress bar per image counting its tiles.

    Returns:
        A ``Result`` for a single image, else a list with one ``Result`` per input, in order.
        In a list, an input that cannot be read (missing or corrupt file, empty array) or on
        which the model fails gets a ``Result`` with no detections and the reason in
        ``.error`` (also logged); the other inputs' results are unaffected.

    Raises:
        ValueError: ``score_thresh`` or ``mask_thresh`` outside [0, 1] or NaN; an unknown ``precision``, or
            fp16 on a CPU; bad tiling options (``tiling.check_options``). For a single input, whatever
            stopped it is raised (e.g. ``DatasetError`` for an unreadable file, ValueError
            for an empty array).
    """
    single = isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor))
    items = [images] if single else list(images)  # type: ignore[list-item]
    check_score_thresh(score_thresh)
    check_probability("mask threshold", mask_thresh)
    model_precision(model, precision)
    tiling.check_options(tile, tile_overlap, tile_whole)
    results = list(_predict(model, items, batch_size, score_thresh, mask_thresh, keep_images, max_pixels, precision,
                            raise_errors=single, tile=tile, tile_overlap=tile_overlap, tile_whole=tile_whole,
                            progress=progress))
    return results[0] if single else results
