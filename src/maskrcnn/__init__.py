"""Mask R-CNN instance segmentation in pure PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"
