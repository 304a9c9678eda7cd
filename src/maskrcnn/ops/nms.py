"""Greedy non-maximum suppression, vectorised.

Semantics are those of torchvision's CPU kernel: boxes are visited by decreasing score (a
stable sort, so equal scores keep their input order) and a box is dropped when its IoU with
an already kept box is ``> iou_threshold``. The IoU is evaluated as that kernel does:
``inter = max(0, xx2 - xx1) * max(0, yy2 - yy1)``, ``iou = inter / (area_i + area_j - inter)``
with ``area = (x2 - x1) * (y2 - y1)``, all in the boxes' dtype, and compared with the
threshold as a double.

Instead of one Python step per box, the sorted boxes are processed in blocks of ``_BLOCK``:
within a block the greedy result is the fixed point of "keep a box unless a kept box ranked
above it suppresses it" (Cluster-NMS, Zheng et al. 2020), found by iterating that rule from
"keep all"; the rule only looks at higher ranks, so its fixed point is unique and equals the
greedy answer. The block's kept boxes then suppress the later boxes in one vectorised step,
so boxes already suppressed never enter an IoU computation (the cost is about ``K * N`` IoUs
for K kept boxes, as in the C++ kernel).

On a GPU the arithmetic is nearly free and every Python step costs kernel launches and a wait
for the device (``nonzero``, the fixed-point test), so there blocks are larger and
``batched_nms`` suppresses all groups in one pass, with pairs from different groups masked
out, instead of one pass per group (up to 90 per image in the box head's per-class NMS).

Shape shorthand: N boxes, K kept boxes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nms", "batched_nms"]

# Boxes per block. Larger blocks mean fewer Python steps but more wasted IoUs on boxes that an
# earlier box of the same block suppresses; 256 is near the minimum of the run time for
# 1000-5000 boxes on CPU. On other devices each step costs a synchronisation, so blocks cover
# the ~5000 RPN candidates of an image in 3 steps (a 2048 x 2048 overlap matrix is 4 MB).
_BLOCK = 256
_BLOCK_GPU = 2048


def _block_size(device: torch.device) -> int:
    return _BLOCK if device.type == "cpu" else _BLOCK_GPU


def _iou_threshold(iou_threshold: float, dtype: torch.dtype) -> Tensor:
    """The largest ``dtype`` value ``t`` such that ``iou > t`` equals ``double(iou) > iou_threshold``.

    The C++ kernel compares a float IoU with a double threshold; rounding the threshold to
    float32 to the nearest would differ when it rounds up and an IoU equals the rounded value.
    A 0-dim CPU tensor: it compares with tensors on any device without a copy or a sync.
    """
    t = torch.tensor(iou_threshold, dtype=dtype)
    if float(t) > iou_threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t


def _pairwise_overlap(a: Tensor, area_a: Tensor, b: Tensor, area_b: Tensor, thresh: Tensor) -> Tensor:
    """``iou(a_i, b_j) > thresh`` as ``Tensor[A, B]`` bool, in the C++ kernel's arithmetic.

    ``a`` and ``b`` are coordinate-major, ``Tensor[4, A]`` and ``Tensor[4, B]`` (rows x1, y1,
    x2, y2), so each broadcast reads contiguous rows.
    """
    xx1 = torch.maximum(a[0, :, None], b[0, None, :])  # (A, B)
    yy1 = torch.maximum(a[1, :, None], b[1, None, :])
    xx2 = torch.minimum(a[2, :, None], b[2, None, :])
    yy2 = torch.minimum(a[3, :, None], b[3, None, :])
    inter = xx2.sub_(xx1).clamp_(min=0).mul_(yy2.sub_(yy1).clamp_(min=0))  # (A, B)
    union = (area_a[:, None] + area_b[None, :]).sub_(inter)
    return inter.div_(union) > thresh


def _greedy_sorted(boxes: Tensor, iou_threshold: float, groups: Tensor | None = None) -> Tensor:
    """Greedy NMS of boxes already sorted by decreasing score.

    Args:
        boxes: ``Tensor[N, 4]`` sorted ``(x1, y1, x2, y2)``.
        groups: optional ``Tensor[N]`` group of each box; boxes of different groups never
            suppress each other (each group's result is its own greedy NMS).

    Returns:
        ``Tensor[N]`` bool, True for kept boxes.
    """
    n = boxes.shape[0]
    if n <= 1:
        return torch.ones(n, dtype=torch.bool, device=boxes.device)
    thresh = _iou_threshold(iou_threshold, boxes.dtype)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    coords = boxes.t().contiguous()  # (4, N)
    alive = torch.ones(n, dtype=torch.bool, device=boxes.device)  # not suppressed so far
    block = _block_size(boxes.device)
    for start in range(0, n, block):
        end = min(start + block, n)
        cand = torch.nonzero(alive[start:end]).squeeze(1) + start  # (c,)
        if cand.numel() == 0:
            continue
        b, a = coords[:, cand], areas[cand]
        # over[i, j]: candidate i (ranked above j) would suppress candidate j.
        over = _pairwise_overlap(b, a, b, a, thresh)  # (c, c)
        if groups is not None:
            over &= groups[cand, None] == groups[None, cand]
        over.triu_(diagonal=1)
        keep = torch.ones(cand.numel(), dtype=torch.bool, device=boxes.device)
        while True:
            new_keep = ~(over & keep[:, None]).any(0)
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        alive[cand[~keep]] = False
        kept = cand[keep]
        if end == n:
            break
        rest = torch.nonzero(alive[end:]).squeeze(1) + end  # later boxes still alive
        if rest.numel() == 0:
            break
        over = _pairwise_overlap(coords[:, kept], areas[kept], coords[:, rest], areas[rest], thresh)  # (k, r)
        if groups is not None:
            over &= groups[kept, None] == groups[None, rest]
        alive[rest[over.any(0)]] = False
    return alive


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (torchvision ``nms`` semantics).

    Args:
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)``, float.
        scores: ``Tensor[N]`` float, higher is better.
        iou_threshold: a box is discarded when its IoU with a higher-scored kept box is
            strictly greater than this.

    Returns:
        ``Tensor[K]`` int64 indices of the kept boxes, by decreasing score (ties in input order).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, stable=True, descending=True)[1]
    keep = _greedy_sorted(boxes[order], iou_threshold)
    return order[keep]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    torchvision_compat: bool = False,
) -> Tensor:
    """Non-maximum suppression done independently within each group (class or level).

    Boxes with different ``idxs`` never suppress each other: each group gets its own greedy
    NMS, with :func:`nms`'s exact arithmetic. On the CPU each group is suppressed on its own
    (:func:`_batched_by_group`); on other devices all groups go through one pass
    (:func:`_batched_in_one_pass`). Both give the same indices.

    Args:
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)``, float.
        scores: ``Tensor[N]`` float.
        idxs: ``Tensor[N]`` int64 group of each box.
        iou_threshold: as in :func:`nms`.
        torchvision_compat: reproduce torchvision's ``batched_nms`` decisions bit for bit. For
            up to 1000 boxes on CPU (5000 on CUDA) torchvision offsets each group's boxes by
            ``group * (max coordinate + 1)`` and runs one NMS; the shifted coordinates are
            rounded, which can flip decisions whose IoU lies within about ``1e-4`` of the
            threshold. The default (False) suppresses within each group exactly.

    Returns:
        ``Tensor[K]`` int64 indices of the kept boxes, by decreasing score (stable).
    """
    if torch.onnx.is_in_onnx_export():
        return _batched_nms_onnx(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if torchvision_compat and boxes.numel() <= (4000 if boxes.device.type == "cpu" else 20000):
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    if boxes.device.type == "cpu":
        return _batched_by_group(boxes, scores, idxs, iou_threshold)
    return _batched_in_one_pass(boxes, scores, idxs, iou_threshold)


def _batched_in_one_pass(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """All groups in one greedy pass by decreasing score, pairs of different groups masked out:
    a few Python steps whatever the number of groups, at the price of computing the IoUs of
    cross-group pairs too."""
    order = torch.sort(scores, stable=True, descending=True)[1]
    return order[_greedy_sorted(boxes[order], iou_threshold, idxs[order])]


def _batched_by_group(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """One greedy pass per group: only same-group IoUs, one Python loop step per group."""
    # Sort by score (stable), then by group (stable): groups become contiguous runs, each by
    # decreasing score with ties in input order.
    order = torch.sort(scores, stable=True, descending=True)[1]
    order = order[torch.sort(idxs[order], stable=True)[1]]
    sorted_boxes = boxes[order]
    counts = torch.unique_consecutive(idxs[order], return_counts=True)[1].tolist()
    keep = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    start = 0
    for count in counts:
        keep[start : start + count] = _greedy_sorted(sorted_boxes[start : start + count], iou_threshold)
        start += count
    kept = torch.sort(order[keep])[0]  # input order, so equal scores stay in input order below
    return kept[torch.sort(scores[kept], stable=True, descending=True)[1]]


# ------------------------------------------------------------------ ONNX form
class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` for one batch of G groups: one graph node on export; in PyTorch
    (the values the exporter traces with) :func:`nms` on each group.

    ``boxes`` (1, N, 4), ``scores`` (1, G, N) with ``-inf`` where a box is not in the group.
    Returns ``Tensor[K, 3]`` int64 rows ``(0, group, box index)``, as the ONNX op does.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:  # type: ignore[override]
        # Computed untraced: the exporter keeps only the symbolic node, and the loop's shapes
        # would otherwise enter the trace.
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            rows = []
            for g in range(int(scores.shape[1])):
                members = torch.where(scores[0, g] > float("-inf"))[0]
                kept = members[nms(boxes[0, members], scores[0, g, members], iou_threshold)]
                rows.append(torch.stack((torch.zeros_like(kept), torch.full_like(kept, g), kept), 1))
            return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float):  # type: ignore[no-untyped-def]
        def const(value: Tensor):  # type: ignore[no-untyped-def]
            return g.op("Constant", value_t=value)

        # The ONNX op's IoU test is ``iou > threshold`` in float32, as :func:`nms`'s. Members
        # only: ``-inf`` is not above the lowest float32, every real score is.
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            const(torch.tensor([2**31 - 1], dtype=torch.int64)),
            const(torch.tensor([iou_threshold], dtype=torch.float32)),
            const(torch.tensor([torch.finfo(torch.float32).min], dtype=torch.float32)),
        )


def _batched_nms_onnx(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """:func:`batched_nms` as ONNX operators, for ``torch.onnx.export``: the Python loops of the
    greedy passes cannot be traced, the ONNX op does the same per group. Groups go in the op's
    class dimension (a (G, N) score table, -inf outside each group), so no box is shifted and
    no rounding differs from the exact per-group NMS (torchvision's export shifts boxes)."""
    groups = torch.arange(torch.cat((idxs, idxs.new_zeros(1))).max() + 1, device=idxs.device)  # (G,)
    table = torch.where(idxs[None, :] == groups[:, None], scores[None, :], float("-inf"))  # (G, N)
    kept = _NonMaxSuppression.apply(boxes[None], table[None], iou_threshold)[:, 2]  # grouped
    kept = torch.sort(kept)[0]  # input order, so that equal scores keep it below
    # ONNX TopK puts equal values in index order: the stable descending sort of batched_nms.
    return kept[torch.topk(scores[kept], kept.shape[0])[1]]
