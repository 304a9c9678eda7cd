"""The input size: the one setting that trades accuracy for frames per second.

A Mask R-CNN's time is mostly the backbone and the FPN, which grow with the pixels of the
resized image: a 512-pixel short side has 0.41x the pixels of 800. ``with_input_size``
changes the size a loaded model resizes images to (its ``Preprocessor``, shared by the PyTorch
and the ONNX Runtime model), keeping the long-side cap in proportion (1333 at 800 -> 853 at 512).
``benchmarks/bench_fps.py`` measures frames per second and mask AP at each size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from ..model.build import build_preprocessor

M = TypeVar("M")  # MaskRCNN or OnnxModel: both resize through ``.preprocess`` built from ``.config``
MIN_INPUT_SIZE = 32  # the coarsest FPN stride: a smaller image has no P5 cell
# At a 4096-px short side (5461 long) one 256-channel map at stride 4 is already 1.4 GB of
# float32; at 100000 px it would be 850 GB, and the run died of memory after loading. Large
# images go by tiles, at native resolution.
MAX_INPUT_SIZE = 4096


def with_input_size(model: M, short_side: int) -> M:
    """Make ``model`` resize images to ``short_side`` pixels on the short side (the long side
    at most the model's ``max_size`` scaled alike). Changes ``model`` in place and returns it.

    Raises:
        ValueError: ``short_side`` outside ``MIN_INPUT_SIZE``..``MAX_INPUT_SIZE``.
    """
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < MIN_INPUT_SIZE:
        raise ValueError(f"the input size must be an integer of at least {MIN_INPUT_SIZE} pixels, got {short_side!r}")
    if short_side > MAX_INPUT_SIZE:
        raise ValueError(
            f"the input size must be at most {MAX_INPUT_SIZE} pixels, got {short_side} "
            "(large images at native resolution: --tile, or tile= in the API)"
        )
    t = model.config.transform  # type: ignore[attr-defined]
    # The long-side cap scales with the short side: a wide frame shrinks as much as a square one.
    longest = max(short_side, round(t.max_size * short_side / max(t.min_size)))
    config = replace(model.config, transform=replace(t, min_size=(short_side,), max_size=longest))  # type: ignore[attr-defined]
    device = getattr(model, "device", "cpu")
    model.config = config  # type: ignore[attr-defined]
    model.preprocess = build_preprocessor(config.transform).eval().to(device)  # type: ignore[attr-defined]
    return model
