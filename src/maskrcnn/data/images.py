"""Reading images into RGB arrays, shared by the datasets, the predictor and the CLI.

Every image, read from a file or handed over as a PIL image or an array, goes through
``to_rgb``, the one rule that turns pixels of any mode or dtype into 8-bit RGB:

- 8-bit data (uint8 arrays; Pillow's L, P, RGB, RGBA, LA, CMYK, ... modes): as is, converted
  to RGB (alpha dropped, gray repeated); bool arrays: True is 255.
- 16-bit integers (uint16/int16 arrays, Pillow's I;16 modes): divided by 257, which maps
  0..65535 exactly onto 0..255, whatever the image's own range (a dark image stays dark).
- Floats (float arrays, Pillow's F mode): times 255 when every value is in [0, 1].
- Floats beyond 1 and wider integers (int32/int64 arrays, Pillow's I mode): divided by 257
  when every value fits 16 bits, else scaled by the image's own maximum, since no bit depth
  can be assumed. NaN and infinities become 0, negative values 0.
- Or, for a model whose ``transform.percentiles`` are set (microscopy), every image's values
  between those percentiles stretched to 0..255 (``data.normalize``), whatever its bit depth.

Files are opened with EXIF orientation applied (pixels in the frame a photo viewer shows, the
frame annotation tools use). Only regular files are opened (a FIFO or device would block
forever), and an image with more than ``max_pixels`` pixels is refused by name before it is
decoded; ``MAX_PIXELS`` is the default for every reader in the package.
"""

from __future__ import annotations

import contextlib
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import DatasetError
from .normalize import image_range, stretch

log = logging.getLogger(__name__)
_WARNED_ANIMATED: set[str] = set()  # animated images already warned about: only their first frame is read

# Pillow refuses images above twice its MAX_IMAGE_PIXELS (2 x 89,478,485, e.g. 13,400 x 13,400)
# as a decompression bomb; the same number here keeps every image that opened before, but the
# refusal now names the file and the limit, and is configurable (predict --max-pixels).
MAX_PIXELS = 178_956_970
# The limit of a tiled run (``predict(tile=)``, ``--tile``), which never holds the image as a
# float batch: a billion pixels, 31,600 px a side (Pillow holds RGB at 4 bytes a pixel: 4 GB).
TILED_MAX_PIXELS = 1_000_000_000

# Pillow modes that hold one channel of more than 8 bits per pixel.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# The suffixes of the image files that a folder given to `maskrcnn predict` (or a calibration folder) holds.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def _wide_to_uint8(a: np.ndarray, sixteen_bit: bool, peak: float | None = None) -> np.ndarray:
    """(H, W[, C]) uint8 from 16-bit, wider integer or float values, by the module's rule;
    ``peak``: the maximum to decide and scale by, when ``a`` is one part of a larger image."""
    floating = np.issubdtype(a.dtype, np.floating)
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    if peak is None:
        peak = float(a.max()) if a.size else 0.0
    if floating and peak <= 1.0:
        a = a * 255.0
    elif sixteen_bit or peak <= 65535:
        a = a / 257.0
    else:
        a = a * (255.0 / peak)
    return np.rint(a).clip(0, 255).astype(np.uint8)


def to_rgb(
    image: Image.Image | np.ndarray, peak: float | None = None, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Pixels of a PIL image or an array -> (H, W, 3) uint8 RGB, by the rule in the module docstring.

    Args:
        image: a PIL image of any mode (no EXIF orientation is applied here), or an (H, W),
            (H, W, 3) or (H, W, 4) array of any numeric or bool dtype.
        peak: for wide data (more than 16 bits, floats), the maximum of the whole image when
            ``image`` is one tile of it, so that every tile is scaled alike (default: its own).
        value_range: (low, high) pixel values to stretch to 0..255 instead of the fixed rule
            (``data.normalize``: the image's percentiles, for microscopy).

    Raises:
        ValueError: an array of another shape, or an image with no pixels.
    """
    if value_range is not None:
        gray_or_rgb = stretch(pixel_values(image), *value_range)
        if gray_or_rgb.ndim == 2:
            gray_or_rgb = np.repeat(gray_or_rgb[:, :, None], 3, axis=2)
        if gray_or_rgb.shape[0] == 0 or gray_or_rgb.shape[1] == 0:
            raise ValueError(f"image has no pixels (size {gray_or_rgb.shape[0]}x{gray_or_rgb.shape[1]})")
        return gray_or_rgb
    if isinstance(image, Image.Image):
        if image.mode in _WIDE_MODES:
            gray = _wide_to_uint8(np.asarray(image), sixteen_bit=image.mode in _16_BIT_MODES, peak=peak)
            rgb = np.repeat(gray[:, :, None], 3, axis=2)
        else:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # avoids Pillow's warning on palette transparency
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
            rgb = rgb if rgb.flags.writeable else rgb.copy()
    else:
        a = np.asarray(image)
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
            raise ValueError(f"array images must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
                raise ValueError(f"array images must hold numbers, got dtype {a.dtype}")
            a = _wide_to_uint8(a, sixteen_bit=a.dtype in (np.uint16, np.int16), peak=peak)
        rgb = np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else np.ascontiguousarray(a[:, :, :3])
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image has no pixels (size {rgb.shape[0]}x{rgb.shape[1]})")
    return rgb


def pixel_values(image: Image.Image | np.ndarray) -> np.ndarray:
    """The numbers ``to_rgb`` converts: (H, W) for one-channel wide data and gray arrays,
    (H, W, 3) otherwise (alpha dropped, palettes and other 8-bit modes as RGB, bool as 0 / 255)."""
    if isinstance(image, Image.Image):
        if image.mode in _WIDE_MODES:
            return np.asarray(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"array images must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"array images must hold numbers, got dtype {a.dtype}")
    return a if a.ndim == 2 else a[:, :, :3]


def normalized_rgb(image: Image.Image | np.ndarray, percentiles: tuple[float, float] | None) -> np.ndarray:
    """``to_rgb`` of a whole image; with ``percentiles`` (``data.normalize``) its values
    between those percentiles stretched to 0..255 instead of the fixed rule."""
    if percentiles is None:
        return to_rgb(image)
    return to_rgb(image, value_range=image_range(pixel_values(image), percentiles))


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Iterator[Image.Image]:
    """``Image.open`` (header only, lazy decode) of a regular file no larger than ``max_pixels``.

    Raises:
        DatasetError: the path is missing, not a regular file (a folder, FIFO, device), not an
            image Pillow recognises, or over ``max_pixels`` (None: no limit).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise DatasetError(f"image path is a directory, not a file: {path}")
    if not stat.S_ISREG(mode):
        raise DatasetError(f"not a regular file (a FIFO, socket or device?), not read: {path}")
    try:
        with _pillow_limit_off():  # Pillow's bomb check is replaced by the one below, which names the file
            img = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from None
    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise DatasetError(
                f"image {path} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
                f"(raise it with --max-pixels / max_pixels= if the image is trusted; a tiled run, --tile / tile=, "
                f"reads up to {TILED_MAX_PIXELS:,})"
            )
        yield img


@contextlib.contextmanager
def _pillow_limit_off() -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_in_place(img: Image.Image, path: str | Path) -> None:
    """Decode an image from ``open_image`` with EXIF orientation applied, without a copy.

    For tiled runs, which cut the decoded image tile by tile: Pillow's own pixel limit, which
    an uncompressed TIFF of 20000 x 20000 px trips when decoded, is lifted as at open
    (``open_image`` has applied the caller's ``max_pixels``).

    Raises:
        DatasetError: the pixels cannot be decoded.
    """
    try:
        with _pillow_limit_off():
            ImageOps.exif_transpose(img, in_place=True)  # decodes first
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from None


def load_rgb(
    path: str | Path, max_pixels: int | None = MAX_PIXELS, percentiles: tuple[float, float] | None = None
) -> np.ndarray:
    """Read an image file as an EXIF-oriented 8-bit RGB array (``to_rgb``'s rule).

    Args:
        path: a regular file in any format Pillow decodes.
        max_pixels: refuse larger images before decoding them (None: no limit).
        percentiles: (low, high) to stretch the image's own values by (``normalized_rgb``),
            or None for the fixed rule.

    Returns:
        (H, W, 3) uint8 array, H x W after EXIF orientation.

    Raises:
        DatasetError: the file does not exist, is not a regular file, is over ``max_pixels``
            or cannot be decoded.
    """
    with open_image(path, max_pixels) as img:
        if getattr(img, "is_animated", False) and str(path) not in _WARNED_ANIMATED:  # once a file (training rereads)
            _WARNED_ANIMATED.add(str(path))
            log.warning(
                "%s has %d frames; only the first is read as an image (maskrcnn predict runs an animated GIF "
                "as a video)",
                path,
                getattr(img, "n_frames", 0),
            )
        try:
            img = ImageOps.exif_transpose(img)  # also forces the full decode
            return normalized_rgb(img, percentiles)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from None


def image_size(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image after EXIF orientation, read from the header only.

    Raises:
        DatasetError: the file does not exist, is not a regular file or not an image Pillow
            recognises, or is over ``max_pixels``.
    """
    with open_image(path, max_pixels) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from None
    # Orientations 5..8 rotate by 90 degrees, swapping height and width.
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) float32 tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
