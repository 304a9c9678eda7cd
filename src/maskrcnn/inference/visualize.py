"""Training curves and prediction grids as PNG files.

The per-image overlay (masks, boxes, labels) is ``Result.plot``; this module only lays
pictures out. Matplotlib is used through the Agg canvas directly, so importing this module
never changes the process-wide pyplot backend.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from maskrcnn.files import atomic_write
from maskrcnn.inference.results import Result

logger = logging.getLogger(__name__)

__all__ = ["read_jsonl", "plot_metrics", "draw_grid"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Dict records of a JSON-lines file; blank and unparsable lines are skipped with a warning."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: not JSON, skipped", path, n)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def plot_metrics(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot a training log: losses on the left, AP on the right.

    Each line of ``metrics_jsonl`` is a dict. Lines with keys starting with "loss" are
    training steps, plotted against "iter" (the global iteration; line order when absent).
    "val_loss" is plotted per "epoch" at the last iteration logged for that epoch (on an
    epoch axis when the training lines carry no epoch). Keys "bbox_AP", "segm_AP" (and
    their "AP50" variants) are plotted per epoch. Missing keys just leave curves out.
    """
    records = read_jsonl(metrics_jsonl)
    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_ap = fig.subplots(1, 2)

    train = [r for r in records if any(k.startswith("loss") and _is_number(v) for k, v in r.items())]
    iters = [r.get("iter", n) for n, r in enumerate(train)]
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    for key in loss_keys:
        ys = [_number(r.get(key)) for r in train]
        if key == "loss":
            ax_loss.plot(iters, ys, color="black", linewidth=1.5, label=key)
        else:
            ax_loss.plot(iters, ys, linewidth=1.0, alpha=0.8, label=key)

    val = [r for r in records if _is_number(r.get("val_loss")) and "epoch" in r]
    if val:
        epoch_end = {}  # epoch -> last training iteration logged in it
        for r, it in zip(train, iters):
            if "epoch" in r:
                epoch_end[r["epoch"]] = max(epoch_end.get(r["epoch"], it), it)
        if all(r["epoch"] in epoch_end for r in val):
            ax_loss.plot(
                [epoch_end[r["epoch"]] for r in val],
                [r["val_loss"] for r in val],
                "o-",
                color="tab:red",
                label="val_loss",
            )
        else:
            ax_epoch = ax_loss.twiny()
            ax_epoch.plot(
                [r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red", label="val_loss"
            )
            ax_epoch.set_xlabel("epoch (val_loss)")
            ax_epoch.legend(loc="upper center", fontsize=8)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("losses")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax_loss.transAxes)

    ap_keys = sorted({k for r in records for k in r if k.endswith(("_AP", "_AP50")) and _is_number(r[k])})
    for key in ap_keys:
        rows = [r for r in records if _is_number(r.get(key))]
        xs = [r.get("epoch", n) for n, r in enumerate(rows)]
        ax_ap.plot(xs, [r[key] for r in rows], "o-", label=key)
    ax_ap.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("AP")
    ax_ap.set_title("validation AP")
    ax_ap.grid(alpha=0.3)
    if ap_keys:
        ax_ap.legend(fontsize=8)
    else:
        ax_ap.text(0.5, 0.5, "no AP logged", ha="center", va="center", transform=ax_ap.transAxes)

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(out_png, lambda f: f.write(buffer.getvalue()))


def draw_grid(
    images: Sequence[Image.Image | Result],
    out_png: str | Path | None = None,
    cols: int = 3,
    cell: int = 512,
) -> Image.Image:
    """Tile pictures into one image, each scaled to fit a ``cell`` x ``cell`` square.

    Args:
        images: PIL images, or ``Result``s (drawn with ``Result.plot()``).
        out_png: where to write the grid (atomically); not written when None.
        cols: pictures per row.
        cell: side of each square cell in pixels.

    Returns:
        The grid, an RGB PIL image of (rows * cell) x (cols * cell).
    """
    if not images:
        raise ValueError("draw_grid needs at least one image")
    pictures = [im.plot() if isinstance(im, Result) else im.convert("RGB") for im in images]
    cols = max(1, min(cols, len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), (32, 32, 32))
    for n, picture in enumerate(pictures):
        scale = min(cell / picture.width, cell / picture.height)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        thumb = picture.resize(size, Image.Resampling.BILINEAR)
        r, c = divmod(n, cols)
        grid.paste(thumb, (c * cell + (cell - size[0]) // 2, r * cell + (cell - size[1]) // 2))
    if out_png is not None:
        atomic_write(out_png, lambda f: grid.save(f, format="PNG"))
    return grid


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan
