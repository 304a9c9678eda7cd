"""The images of the parity sweeps (``sweep.py`` against the references, ``onnx_sweep.py``
against ONNX Runtime): photos cropped so that objects touch the borders, resized to cover every
padding case and aspect ratio. Imports nothing but numpy, Pillow and scikit-image's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kudzu_bug" / "images"

# name -> (source, crop (x0, y0, x1, y1) as fractions of the source, output (w, h)). Both references
# resize the short side to 800 (long side at most 1333) and pad to a multiple of 32; the comment
# gives the resized and padded size (w x h) and what it covers. Crops cut through objects, so
# objects touch the borders.
IMAGES = {
    "sq300": ("astronaut", (0.1, 0.05, 0.9, 0.85), (300, 300)),  # 800x800, up 2.67x; /32 odd, /64 not whole
    "land4:3": ("train_3.jpg", (0.0, 0.0, 1.0, 1.0), (1024, 768)),  # 1067x800 -> 1088x800; /64 17 odd
    "port3:4": ("chelsea", (0.1, 0.0, 0.7, 1.0), (480, 640)),  # 800x1067 -> 800x1088
    "land3:2s1333": (
        "coffee",
        (0.0, 0.1, 1.0, 0.9),
        (2000, 1333),
    ),  # short side 1333, down 1.67x: 1200x800 -> 1216x800; /64 19 odd
    "land1.74": (
        "train_7.jpg",
        (0.0, 0.1, 1.0, 0.9),
        (1389, 800),
    ),  # clamp: 1333x768 -> 1344x768; /32 42, 24 even; /64 21 odd, 12 even
    "port1:1.9": ("astronaut", (0.2, 0.0, 0.7, 1.0), (400, 760)),  # clamp: 702x1333 -> 704x1344; /64 11 odd, 21 odd
    "land2:1": ("rocket", (0.0, 0.3, 1.0, 0.8), (1200, 600)),  # clamp: 1333x666 -> 1344x672; /32 21 odd
    "land10:1": ("train_12.jpg", (0.0, 0.4, 1.0, 0.55), (1000, 100)),  # 1333x133 -> 1344x160; /32 5 odd
    "land30:1": ("train_20.jpg", (0.0, 0.45, 1.0, 0.5), (1500, 50)),  # 1333x44 -> 1344x64; /64 1 odd
    "port1:30": ("astronaut", (0.48, 0.0, 0.52, 1.0), (50, 1500)),  # 44x1333 -> 64x1344
}


def load_case_image(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of case ``name``: its source photo cropped, then resized."""
    source, (x0, y0, x1, y1), size = IMAGES[name]
    if source.endswith(".jpg"):
        src = np.array(Image.open(PHOTOS / source).convert("RGB"))
    else:
        import skimage.data

        src = getattr(skimage.data, source)()
        src = np.stack([src] * 3, -1) if src.ndim == 2 else src[..., :3]
    h, w = src.shape[:2]
    crop = Image.fromarray(src[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)])
    return np.array(crop.resize(size, Image.BILINEAR))
