"""``Predictor``: a model and its ``PredictOptions``; images in whatever form a user has in,
``Result`` objects out. ``model.predict(images, **options)`` is ``Predictor(model, ...)(images)``.

One loop (``Predictor.batches``) runs a model over images for the API, ``maskrcnn predict``,
``maskrcnn evaluate``, the demo, video, tiles and training validation: it reads each input when
its batch comes up, so memory holds one batch, and an input that cannot be read or that the
model fails on becomes a ``Result`` with ``error`` set while the others go on (validation,
which also computes losses, raises instead).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..data.images import MAX_PIXELS, decode_in_place, load_rgb, normalized_rgb, open_image
from ..data.normalize import check_percentiles
from ..model.mask_rcnn import MaskRCNN
from ..precision import autocast
from ..precision import resolve as resolve_precision
from ..structures import Targets
from ..weights.onnx_model import OnnxModel
from . import tiling
from .options import PredictOptions
from .results import DISPLAY_SIZE, Result

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
_Loaded = tuple[str, np.ndarray, str | None]  # an input read: (name, (H, W, 3) uint8 RGB, path)


def as_rgb(
    image: ImageLike, max_pixels: int | None = MAX_PIXELS, percentiles: tuple[float, float] | None = None
) -> tuple[np.ndarray, str | None]:
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
            raise ValueError(
                f"tensor images must be (3, H, W) floats in 0..1 with H, W > 0, got shape {tuple(image.shape)}"
            )
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


def model_precision(model: MaskRCNN | OnnxModel, precision: str) -> str:
    """The precision ``model`` runs at (``precision.resolve``). An ONNX model computes float32
    only: "auto" means fp32 there, and bf16 or fp16 are refused rather than silently ignored."""
    if isinstance(model, OnnxModel):
        if precision in ("bf16", "fp16"):
            raise ValueError(
                f"precision {precision}: an exported model runs in float32 (ONNX Runtime, OpenVINO); "
                "bf16 and fp16 apply to PyTorch checkpoints (use fp32 or auto)"
            )
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


class Predictor:
    """A model and the options it runs with.

        predictor = Predictor(model, PredictOptions(score_thresh=0.5, tile=1024))
        result = predictor("photo.jpg")             # one Result
        results = predictor(["a.jpg", "b.png"])     # one Result per input, failures in .error
        for result in predictor.stream(paths): ...  # as each batch is done

    Args:
        model: a ``MaskRCNN`` (switched to eval mode for each run), or an ``OnnxModel`` (an
            exported file on ONNX Runtime, ``maskrcnn.load("model.onnx")``).
        options: how to run it (``PredictOptions``); ``**changes`` replace some of its fields.

    Raises:
        ValueError: bad options (``PredictOptions``); a precision the model cannot run
            (fp16 on a CPU, bf16 on ONNX Runtime).
    """

    def __init__(self, model: MaskRCNN | OnnxModel, options: PredictOptions | None = None, **changes: object) -> None:
        options = options or PredictOptions()
        self.model = model
        self.options = options.replace(**changes) if changes else options
        self.numerics = model_precision(model, self.options.precision)

    def __call__(self, images: ImageLike | Iterable[ImageLike]) -> Result | list[Result]:
        """A ``Result`` for a single image, else a list with one ``Result`` per input, in order.

        In a list, an input that cannot be read (missing or corrupt file, empty array) or on
        which the model fails gets a ``Result`` with no detections and the reason in ``.error``
        (also logged); the other inputs' results are unaffected. For a single input, whatever
        stopped it is raised (``DatasetError`` for an unreadable file, ValueError for an empty
        array).
        """
        single = isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor))
        items = [images] if single else list(images)  # type: ignore[list-item]
        results = list(self._run(items, raise_errors=single))
        return results[0] if single else results

    def stream(self, images: Iterable[ImageLike]) -> Iterator[Result]:
        """Yield one ``Result`` per input, in order, as soon as its batch is done. An input that
        cannot be read, or on which the model fails (a failing batch is retried image by image
        to find it), yields ``Result.failed`` with the reason in ``error``, also logged;
        KeyboardInterrupt is never caught."""
        return self._run(images, raise_errors=False)

    def _run(self, images: Iterable[ImageLike], raise_errors: bool) -> Iterator[Result]:
        if self.options.tile is not None:
            tiles = Predictor(self.model, self.options, tile=None, tile_whole=False, keep_images=False, progress=False)
            for index, item in enumerate(images):
                yield self._tiled(tiles, item, index, raise_errors)
            return

        def chunks() -> Iterator[list[ImageLike]]:
            batch: list[ImageLike] = []
            for item in images:
                batch.append(item)
                if len(batch) >= self.options.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        for results, _ in self.batches(chunks(), raise_errors=raise_errors):
            yield from results

    def _tiled(self, tiles: Predictor, item: ImageLike, index: int, raise_errors: bool) -> Result:
        """One image by tiles (``maskrcnn.inference.tiling``), its tiles run by ``tiles``.

        A file is decoded by Pillow once and cut tile by tile, never converted whole; the
        ``Result`` keeps a preview of at most ``DISPLAY_SIZE`` a side for drawing.
        """
        path = str(item) if isinstance(item, (str, Path)) else None

        def run(batches: Iterable[list[np.ndarray]]) -> Iterator[list[Result]]:
            for results, _ in tiles.batches(batches, raise_errors=raise_errors):
                yield results

        try:
            from .geotiff import RasterioTiles, is_georeferenced

            percentiles = check_percentiles(self.model.config.transform.percentiles)
            if path is None:
                return _predict_tiled(
                    tiling.ArrayTiles(as_rgb(item, self.options.pixel_limit, percentiles)[0]),
                    run,
                    self.options,
                    name=_name(item, index),
                )
            if is_georeferenced(path):  # read window by window, never whole (inference.geotiff)
                with RasterioTiles.open(path, self.options.pixel_limit, percentiles) as source:
                    return _predict_tiled(source, run, self.options, path=path, name=_name(item, index))
            with open_image(path, self.options.pixel_limit) as img:
                decode_in_place(img, path)  # no copy of a huge image
                return _predict_tiled(
                    tiling.PillowTiles(img, percentiles), run, self.options, path=path, name=_name(item, index)
                )
        except (ValueError, TypeError, OSError) as e:  # DatasetError (a ValueError) names the file
            if raise_errors:
                raise
            return _failed(str(e) if path and path in str(e) else f"{_name(item, index)}: {e}", path)

    def batches(
        self,
        batches: Iterable[Sequence[ImageLike]],
        targets: Iterable[Sequence[Targets]] | None = None,
        *,
        raise_errors: bool = False,
    ) -> Iterator[tuple[list[Result], dict[str, Tensor]]]:
        """The one loop that runs a model over images, batch by batch (tiling aside).

        Args:
            batches: lists of inputs, one forward pass each (split further by
                ``batch_groups``, so an image's detections never depend on its batch).
            targets: ground truth for each batch (validation): the losses come from the same
                forward pass as the detections, in eval mode, so a validation loss costs
                nothing extra. With targets, any failure raises.
            raise_errors: a failure raises instead of becoming a failed ``Result``.

        Yields:
            Per batch, one ``Result`` per input in order (a failed input: ``Result.failed``),
            and the batch's loss terms (empty without targets).
        """
        model, options = self.model, self.options
        cfg = model.config
        score_thresh = options.score_thresh
        mask_thresh = cfg.roi_heads.mask_thresh if options.mask_thresh is None else options.mask_thresh
        names = cfg.label_names()
        categories = cfg.label_categories()
        percentiles = check_percentiles(cfg.transform.percentiles)  # read as training read its images
        raise_errors = raise_errors or targets is not None
        # A threshold below the model's lets lower-scored candidates through its NMS too; a higher
        # one filters the model's detections (>=, as documented).
        head_thresh = score_thresh if score_thresh is not None and score_thresh < cfg.roi_heads.score_thresh else None

        def detect(loaded: list[_Loaded], truth: Sequence[Targets] | None) -> tuple[list[Result], dict[str, Tensor]]:
            """One forward pass; a failure on a single image becomes its failed Result."""
            try:
                with torch.inference_mode(), autocast(model.device, self.numerics):
                    # (3, H, W) uint8 views: the model divides by 255 itself, so no float copy of
                    # a 24 MP photo (288 MB) is held here.
                    tensors = [_as_tensor(array).permute(2, 0, 1).to(model.device) for _, array, _ in loaded]
                    out = model(
                        tensors,
                        None if truth is None else [t.to(model.device) for t in truth],
                        score_thresh=head_thresh,
                    )
                    results = []
                    for (_, array, path), det in zip(loaded, out.detections or []):
                        if score_thresh is not None:
                            det = det[det.scores >= score_thresh]
                        image = array if options.keep_images else None
                        results.append(
                            Result.from_detections(
                                det,
                                array.shape[:2],
                                names,
                                mask_thresh,
                                path=path,
                                image=image,
                                paste=cfg.roi_heads.paste,
                                category_table=categories,
                            )
                        )
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

        def process(
            batch: Sequence[ImageLike], start: int, truth: Sequence[Targets] | None
        ) -> tuple[list[Result], dict[str, Tensor]]:
            slots: list[Result | _Loaded] = []
            for index, item in enumerate(batch, start):
                path = str(item) if isinstance(item, (str, Path)) else None
                try:
                    array, _ = as_rgb(item, options.max_pixels, percentiles)
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


def _predict_tiled(
    source: tiling.Source,
    run: Callable[[Iterable[list[np.ndarray]]], Iterator[list[Result]]],
    options: PredictOptions,
    *,
    path: str | None = None,
    name: str = "image",
) -> Result:
    """Run a model over ``source`` tile by tile and merge the detections.

    Args:
        source: the image's pixels.
        run: batches of (t, t, 3) uint8 tiles -> per batch, one tile-frame ``Result`` per
            tile (``Predictor.batches``: the package's one inference loop).
        options: the run's ``PredictOptions``: ``tile`` and ``tile_overlap`` give the grid
            (``tiling.tile_grid``), ``batch_size`` the tiles per forward pass; with ``keep_images`` a
            preview of at most ``DISPLAY_SIZE`` a side is kept in ``Result.image``;
            ``tile_whole`` also runs the whole image shrunk to one tile, for objects larger
            than a tile (``tiling.add_whole_image_pass``); ``progress`` shows a bar counting tiles.

    Returns:
        The merged ``Result``, or ``Result.failed`` naming the first tile that failed.
    """
    from tqdm import tqdm

    tile, overlap, batch_size = options.tile, options.tile_overlap, options.batch_size
    if tile is None:
        raise ValueError("predict_tiled needs options.tile")
    h, w = source.size
    tiles = tiling.tile_grid(h, w, tile, overlap)

    def batches() -> Iterator[list[np.ndarray]]:
        for start in range(0, len(tiles), batch_size):
            yield [source.read(t) for t in tiles[start : start + batch_size]]

    results: list[Result] = []
    with tqdm(total=len(tiles), desc=name[-40:], unit="tile", disable=not options.progress, leave=False) as bar:
        for batch in run(batches()):
            for r in batch:
                if r.error is not None:
                    t = tiles[len(results)]
                    return Result.failed(f"{name}: tile at x={t.x0}, y={t.y0}: {r.error}", path=path)
                results.append(r)
            bar.update(len(batch))
    image = tiling.preview(source, DISPLAY_SIZE) if options.keep_images else None
    merged = tiling.merge_tiles(tiles, results, (h, w), path=path, image=image)
    log.debug("%s: %d tiles, %d detections merged into %d", name, len(tiles), sum(map(len, results)), len(merged))
    if options.tile_whole and len(tiles) > 1:
        merged = tiling.add_whole_image_pass(source, run, tile, overlap, merged)
    return merged


def predict(
    model: MaskRCNN | OnnxModel, images: ImageLike | Iterable[ImageLike], **options: object
) -> Result | list[Result]:
    """``model.predict(images, **options)``: ``Predictor(model, PredictOptions(**options))(images)``.

    Args:
        model: a ``MaskRCNN`` or an ``OnnxModel``.
        images: a path, PIL image, array or (3, H, W) float tensor in 0..1, or a list of them.
        **options: ``PredictOptions`` fields: ``score_thresh``, ``mask_thresh``, ``batch_size``,
            ``max_pixels``, ``precision``, ``tile``, ``tile_overlap``, ``tile_whole``,
            ``keep_images``, ``progress`` (their meaning and defaults are documented there).

    Returns:
        A ``Result`` for a single image, else a list with one ``Result`` per input, in order
        (``Predictor.__call__``: how failures are reported).
    """
    return Predictor(model, PredictOptions(**options))(images)  # type: ignore[arg-type]
