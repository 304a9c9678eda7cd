"""Reading image files into RGB arrays, shared by the datasets and the predictor.

Every image goes through ``load_rgb``: EXIF orientation applied (so pixels are in the frame
a photo viewer shows, the frame annotation tools use), then converted to 8-bit RGB whatever
the file's mode: grayscale, palette, RGBA/LA (alpha dropped), CMYK, 16- and 32-bit integer
and float images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import DatasetError

# Pillow modes that hold one channel of more than 8 bits per pixel.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16/32-bit integer or float single-channel image.

    16-bit data (every value <= 65535, the case for 16-bit PNG and TIFF) is divided by 257,
    which maps 0..65535 exactly onto 0..255. Floats in [0, 1] are scaled by 255. Anything
    wider is scaled by its own maximum, since no fixed bit depth can be assumed.
    """
    a = np.asarray(img).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    peak = float(a.max()) if a.size else 0.0
    if img.mode == "F" and peak <= 1.0:
        a = a * 255.0
    elif peak <= 65535:
        a = a / 257.0
    else:
        a = a * (255.0 / peak)
    return np.rint(a).clip(0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an EXIF-oriented 8-bit RGB array.

    Args:
        path: any format Pillow decodes.

    Returns:
        (H, W, 3) uint8 array, H x W after EXIF orientation.

    Raises:
        DatasetError: the file does not exist or cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # also forces the full decode
            if img.mode in _WIDE_MODES:
                gray = _wide_to_uint8(img)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # avoids Pillow's warning on palette transparency
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"image path is a directory, not a file: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image after EXIF orientation, read from the header only.

    Raises:
        DatasetError: the file does not exist or is not an image Pillow recognises.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None
    # Orientations 5..8 rotate by 90 degrees, swapping height and width.
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) float32 tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
