from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data import DatasetError, image_size, load_rgb, to_tensor


def _rgb(h: int = 4, w: int = 6) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_rgb(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("orientation, rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, rotate: int) -> None:
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise for display;
    # 8: counter-clockwise; 3: by 180 degrees.
    a = _rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "x.png", exif=exif)
    expected = np.rot90(a, k=rotate)
    np.testing.assert_array_equal(load_rgb(tmp_path / "x.png"), expected)
    assert image_size(tmp_path / "x.png") == expected.shape[:2]


def test_exif_orientation_jpeg(tmp_path: Path) -> None:
    a = np.zeros((32, 48, 3), dtype=np.uint8)
    a[:16, :16] = 255  # white block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "x.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "x.jpg")
    assert out.shape == (48, 32, 3)
    # After a clockwise turn the block is at the top-right.
    assert out[:16, 16:].mean() > 200 and out[16:, :].mean() < 30 and out[:16, :16].mean() < 30
    assert image_size(tmp_path / "x.jpg") == (48, 32)


def test_grayscale(tmp_path: Path) -> None:
    g = _rgb()[:, :, 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    a = _rgb()
    rgba = np.concatenate([a, np.full((4, 6, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), a)


def test_palette_with_transparency_and_la(tmp_path: Path) -> None:
    p = Image.fromarray(_rgb()).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert load_rgb(tmp_path / "p.png").shape == (4, 6, 3)
    la = Image.fromarray(np.stack([_rgb()[:, :, 0], _rgb()[:, :, 1]], axis=2), mode="LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "la.png")[:, :, 2], _rgb()[:, :, 0])


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    a = np.array([[0, 257, 65535], [255 * 257, 128 * 257, 1]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = load_rgb(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1, 255], [255, 128, 0]])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*nope.png"):
        load_rgb(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="cannot decode.*bad.png"):
        load_rgb(tmp_path / "bad.png")
    with pytest.raises(DatasetError, match="bad.png"):
        image_size(tmp_path / "bad.png")
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")


def test_to_tensor() -> None:
    a = _rgb()
    t = to_tensor(a)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.allclose(t[1, 2, 3], torch.tensor(a[2, 3, 1] / 255.0, dtype=torch.float32))
    assert 0.0 <= t.min() and t.max() <= 1.0


# ---- bad input: one rule for every source, non-regular files, oversized images ------------


def test_16_bit_pixels_get_one_rule_from_a_file_a_pil_image_and_an_array(tmp_path: Path) -> None:
    """A dark 16-bit microscopy frame (max 1000 of 65535) stays dark whichever way it comes in:
    divided by 257, never stretched by its own maximum."""
    from maskrcnn.data.images import to_rgb

    a = np.array([[0, 257, 1000], [514, 771, 999]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "dark.png")
    expected = np.rint(a / 257.0).astype(np.uint8)  # [[0, 1, 4], [2, 3, 4]]
    from_file = load_rgb(tmp_path / "dark.png")
    with Image.open(tmp_path / "dark.png") as im:
        from_pil = to_rgb(im)
    for rgb in (from_file, from_pil, to_rgb(a)):
        assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
        np.testing.assert_array_equal(rgb[:, :, 0], expected)
        np.testing.assert_array_equal(rgb[:, :, 2], expected)


def test_to_rgb_arrays_of_other_types() -> None:
    from maskrcnn.data.images import to_rgb

    np.testing.assert_array_equal(to_rgb(np.array([[0.0, 0.5, 1.0]]))[0, :, 0], [0, 128, 255])  # floats in 0..1
    np.testing.assert_array_equal(to_rgb(np.array([[True, False]]))[0, :, 1], [255, 0])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 7
    assert to_rgb(rgba).shape == (2, 2, 3) and not to_rgb(rgba).any()
    with pytest.raises(ValueError, match="no pixels"):
        to_rgb(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        to_rgb(np.zeros((2, 2, 2), np.uint8))


def test_a_fifo_is_refused_at_once_not_read(tmp_path: Path) -> None:
    import os
    import signal

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    class Hung(BaseException):  # not an OSError: no handler of the code under test may swallow it
        pass

    def hung(*_):
        raise Hung("load_rgb blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(DatasetError, match="not a regular file.*pipe.png"):
            load_rgb(fifo)
        with pytest.raises(DatasetError, match="not a regular file.*pipe.png"):
            image_size(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` 8-bit gray pixels but holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused_by_name_and_limit(tmp_path: Path) -> None:
    # 20000 x 10000 = 200 MP: Pillow's own check raises DecompressionBombError (a traceback in
    # `train` and `convert`); the package's limit must say which file and what limit.
    _png_header_only(tmp_path / "huge.png", 20000, 10000)
    for read in (load_rgb, image_size):
        with pytest.raises(
            DatasetError, match=r"huge\.png is 20000x10000 = 200,000,000 pixels, more than the limit of 178,956,970"
        ):
            read(tmp_path / "huge.png")
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match=r"small\.png is 30x20 = 600 pixels, more than the limit of 599"):
        load_rgb(tmp_path / "small.png", max_pixels=599)
    assert load_rgb(tmp_path / "small.png", max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(DatasetError, match="cannot decode"):  # no limit: Pillow's bomb check stays out of the way
        load_rgb(tmp_path / "huge.png", max_pixels=None)
