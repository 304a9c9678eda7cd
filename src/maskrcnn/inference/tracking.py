"""Multi-object tracking in video: ByteTrack-style association, track ids, line crossings.

``Tracker.update`` takes one frame's detections and gives each a track id that stays the same
for the same object from frame to frame. It follows ByteTrack (Zhang et al., ECCV 2022):

1. every track's box is moved by a constant-velocity Kalman filter to where it should be now;
2. detections scoring at least ``high_thresh`` are matched to all tracks (kept and lost),
   Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on 1 - IoU, pairs under
   ``match_iou`` refused;
3. detections between ``low_thresh`` and ``high_thresh`` (occluded, blurred: the ones a plain
   score cut throws away) are matched to the tracks still unmatched that were seen in the
   previous frame, with the stricter ``low_match_iou``;
4. tracks left unmatched are lost; one lost for more than ``max_lost`` processed frames is
   ended; detections left unmatched that score at least ``high_thresh`` start new tracks
   (low-score ones never do: they get no id).

The IoU of a track and a detection is the box IoU of the predicted box; where both have
masks it is the mean of that and the mask IoU of the track's last mask moved by the predicted
displacement (boxes that overlap while their pixels do not, e.g. a person in front of a car,
are told apart). Matching ignores the class, as ByteTrack does: a detector often calls one
vehicle "car" in one frame and "truck" in the next, and a track's class is the one with the
highest summed score over its detections. A detection left unmatched that covers a tracked
detection of the frame (box IoU at least ``duplicate_iou``: the same object under a second
class, which per-class NMS keeps) gets that track's id and starts no track.

``LineCounter`` counts tracks crossing a segment, once per track and direction, by their
reference point: the bottom centre of the box (where a vehicle or a pedestrian touches the
ground, so the count does not depend on the object's height). ``VideoTracking`` joins both
for ``predict_video``: ids in the JSON Lines, ids and trails in the annotated video, a summary.

Shape shorthand: N detections, T tracks; boxes are float (x1, y1, x2, y2) pixels of the frame.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Crop = tuple[int, int, np.ndarray]  # (y0, x0, (h, w) bool): a mask by its bounding box


@dataclass(frozen=True)
class TrackerOptions:
    """ByteTrack's thresholds (its defaults, where it has one); validated when built."""

    high_thresh: float = 0.5  # detections at least this are matched first and may start tracks
    low_thresh: float = 0.1  # detections from this to high_thresh are matched second, to tracks only
    match_iou: float = 0.2  # least IoU of a first-stage match (ByteTrack: cost 1 - IoU under 0.8)
    low_match_iou: float = 0.5  # least IoU of a second-stage match: low scores need a close fit
    max_lost: int = 30  # processed frames a track is kept without a match (an occlusion gap)
    use_masks: bool = True  # mix in the mask IoU where detections have masks
    duplicate_iou: float = 0.7  # an unmatched detection covering a tracked one this much is the same object
    class_aware: bool = False  # True: a track matches detections of its first class only

    def __post_init__(self) -> None:
        for name in ("high_thresh", "low_thresh", "match_iou", "low_match_iou", "duplicate_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"tracker {name} must be in [0, 1], got {value}")
        if self.low_thresh > self.high_thresh:
            raise ValueError(f"tracker low_thresh {self.low_thresh} is above high_thresh {self.high_thresh}")
        if self.max_lost < 0:
            raise ValueError(f"tracker max_lost must be at least 0, got {self.max_lost}")


# ---- Kalman filter on boxes --------------------------------------------------------------

# ByteTrack's (and DeepSORT's) noise model: standard deviations proportional to the box height,
# so a near, large car may move more pixels between frames than a far, small one.
_STD_POSITION, _STD_VELOCITY = 1 / 20, 1 / 160
_F = np.eye(8) + np.eye(8, k=4)  # constant velocity: state += velocity, one step per processed frame
_H = np.eye(4, 8)  # the measurement is the state's first four entries


def to_xyah(box: np.ndarray) -> np.ndarray:
    """(4,) x1 y1 x2 y2 -> (4,) centre x, centre y, aspect w / h, height: the filter's measurement."""
    w, h = box[2] - box[0], max(box[3] - box[1], 1e-6)
    return np.array([box[0] + w / 2, box[1] + h / 2, w / h, h], dtype=np.float64)


def to_xyxy(xyah: np.ndarray) -> np.ndarray:
    """(4,) centre x, centre y, aspect, height -> (4,) x1 y1 x2 y2."""
    cx, cy, a, h = xyah[:4]
    w = a * h
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float64)


@dataclass
class KalmanBox:
    """A box's state: mean (8,) = (cx, cy, a, h) and their velocities per frame; cov (8, 8)."""

    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def start(cls, box: np.ndarray) -> KalmanBox:
        z = to_xyah(box)
        h = z[3]
        std = [
            2 * _STD_POSITION * h,
            2 * _STD_POSITION * h,
            1e-2,
            2 * _STD_POSITION * h,
            10 * _STD_VELOCITY * h,
            10 * _STD_VELOCITY * h,
            1e-5,
            10 * _STD_VELOCITY * h,
        ]
        return cls(np.r_[z, np.zeros(4)], np.diag(np.square(std)))

    def predict(self) -> None:
        """Advance one frame."""
        h = self.mean[3]
        std = [
            _STD_POSITION * h,
            _STD_POSITION * h,
            1e-2,
            _STD_POSITION * h,
            _STD_VELOCITY * h,
            _STD_VELOCITY * h,
            1e-5,
            _STD_VELOCITY * h,
        ]
        self.mean = _F @ self.mean
        self.cov = _F @ self.cov @ _F.T + np.diag(np.square(std))

    def correct(self, box: np.ndarray) -> None:
        """Fold in a measured box."""
        h = self.mean[3]
        r = np.diag(np.square([_STD_POSITION * h, _STD_POSITION * h, 1e-1, _STD_POSITION * h]))
        s = _H @ self.cov @ _H.T + r  # (4, 4) innovation covariance
        gain = np.linalg.solve(s, _H @ self.cov).T  # (8, 4) = cov H^T S^-1 (S symmetric)
        self.mean = self.mean + gain @ (to_xyah(box) - _H @ self.mean)
        self.cov = self.cov - gain @ s @ gain.T

    @property
    def box(self) -> np.ndarray:
        return to_xyxy(self.mean)


# ---- IoU ---------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (T, 4) and (N, 4) x1 y1 x2 y2 boxes -> (T, N); 0 for empty boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (T, N, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)  # (T, N)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def crop_iou(a: Crop, b: Crop) -> float:
    """IoU of two masks given as crops, computed on the overlap of their boxes only."""
    (ay, ax, am), (by, bx, bm) = a, b
    y0, x0 = max(ay, by), max(ax, bx)
    y1, x1 = min(ay + am.shape[0], by + bm.shape[0]), min(ax + am.shape[1], bx + bm.shape[1])
    inter = 0
    if y1 > y0 and x1 > x0:
        inter = np.count_nonzero(am[y0 - ay : y1 - ay, x0 - ax : x1 - ax] & bm[y0 - by : y1 - by, x0 - bx : x1 - bx])
    union = np.count_nonzero(am) + np.count_nonzero(bm) - inter
    return inter / union if union else 0.0


# ---- tracks ------------------------------------------------------------------------------


@dataclass
class Track:
    """One followed object: its id, class votes, motion state and last mask."""

    id: int
    label: int  # the class of its first detection (``class_aware`` matching uses it)
    kalman: KalmanBox
    score: float
    crop: Crop | None = None  # the last matched mask
    last_box: np.ndarray = field(default_factory=lambda: np.zeros(4))  # the last matched box
    lost: int = 0  # processed frames since the last match
    votes: dict[int, float] = field(default_factory=dict)  # class -> summed score of its detections

    def vote(self, label: int, score: float) -> None:
        self.votes[label] = self.votes.get(label, 0.0) + score

    @property
    def voted_label(self) -> int:
        """The class with the highest summed score (the first detection's on a tie)."""
        return max(self.votes, key=self.votes.__getitem__) if self.votes else self.label


class Tracker:
    """ByteTrack-style tracker (module docstring). Call ``update`` once per processed frame."""

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options or TrackerOptions()
        self.tracks: list[Track] = []  # kept and lost
        self.next_id = 1

    def update(
        self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, crops: list[Crop] | None = None
    ) -> np.ndarray:
        """Match one frame's detections to the tracks.

        Args:
            boxes: (N, 4) x1 y1 x2 y2 pixels; scores: (N,) in [0, 1]; labels: (N,) class ids.
            crops: N masks as (y0, x0, (h, w) bool) crops, or None for box-only detections.

        Returns:
            (N,) int64 track id of each detection, -1 for a low-score one that matched no track.
        """
        opt = self.options
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores, labels = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1)
        ids = np.full(len(boxes), -1, dtype=np.int64)
        for t in self.tracks:
            t.kalman.predict()
        high = np.flatnonzero(scores >= opt.high_thresh)
        low = np.flatnonzero((scores >= opt.low_thresh) & (scores < opt.high_thresh))

        # Stage 1: confident detections against every track, kept or lost.
        pairs = self._match(list(range(len(self.tracks))), high, boxes, labels, crops, opt.match_iou)
        matched_tracks = {t for t, _ in pairs}
        # Stage 2: the rest of the detections against tracks seen in the previous frame.
        recent = [t for t, track in enumerate(self.tracks) if t not in matched_tracks and track.lost == 0]
        pairs += self._match(recent, low, boxes, labels, crops, opt.low_match_iou)

        for t, d in pairs:
            track = self.tracks[t]
            track.kalman.correct(boxes[d])
            track.last_box, track.score, track.lost = boxes[d], float(scores[d]), 0
            track.crop = crops[d] if crops is not None else None
            ids[d] = track.id
            track.vote(int(labels[d]), float(scores[d]))
        self._mark_duplicates(ids, boxes, scores, labels, crops)
        for t in set(range(len(self.tracks))) - {t for t, _ in pairs}:
            self.tracks[t].lost += 1
        self.tracks = [t for t in self.tracks if t.lost <= opt.max_lost]
        for d in high[np.argsort(-scores[high], kind="stable")]:  # the best first: its duplicates follow it
            if ids[d] >= 0:
                continue
            track = Track(
                self.next_id,
                int(labels[d]),
                KalmanBox.start(boxes[d]),
                float(scores[d]),
                crops[d] if crops is not None else None,
                boxes[d],
            )
            track.vote(int(labels[d]), float(scores[d]))
            self.tracks.append(track)
            ids[d] = track.id
            self.next_id += 1
            self._mark_duplicates(ids, boxes, scores, labels, crops)
        return ids

    def _mark_duplicates(
        self, ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, crops: list[Crop] | None
    ) -> None:
        """Give each untracked detection (of at least ``low_thresh``) that covers a tracked one by
        ``duplicate_iou`` (box IoU, or its mean with the mask IoU, as matching measures) that one's
        id, and a vote for its class: one object, one track."""
        free = np.flatnonzero((ids < 0) & (scores >= self.options.low_thresh))
        tracked = np.flatnonzero(ids >= 0)
        if not len(free) or not len(tracked):
            return
        iou = box_iou(boxes[free], boxes[tracked])  # (F, K)
        if self.options.use_masks and crops is not None:
            for i, j in zip(*np.nonzero(iou >= self.options.duplicate_iou)):
                if crops[free[i]][2].size and crops[tracked[j]][2].size:
                    iou[i, j] = (iou[i, j] + crop_iou(crops[free[i]], crops[tracked[j]])) / 2
        by_id = {t.id: t for t in self.tracks}
        for i, d in enumerate(free):
            k = int(np.argmax(iou[i]))
            if iou[i, k] >= self.options.duplicate_iou:
                ids[d] = ids[tracked[k]]
                by_id[int(ids[d])].vote(int(labels[d]), float(scores[d]))

    def _match(
        self,
        tracks: list[int],
        dets: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        crops: list[Crop] | None,
        least_iou: float,
    ) -> list[tuple[int, int]]:
        """Hungarian assignment of ``dets`` (indices into boxes) to ``tracks`` (indices into
        self.tracks) on 1 - IoU; pairs under ``least_iou`` are refused. Returns (track, det) pairs."""
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            raise ValueError("tracking needs scipy: pip install 'maskrcnn[video]'") from None

        if not tracks or not len(dets):
            return []
        iou = self._iou(
            [self.tracks[t] for t in tracks],
            boxes[dets],
            labels[dets],
            None if crops is None else [crops[d] for d in dets],
        )  # (T, N)
        rows, cols = linear_sum_assignment(1.0 - iou)
        return [(tracks[r], int(dets[c])) for r, c in zip(rows, cols) if iou[r, c] >= least_iou and iou[r, c] > 0]

    def _iou(self, tracks: list[Track], boxes: np.ndarray, labels: np.ndarray, crops: list[Crop] | None) -> np.ndarray:
        """(T, N) IoU of the tracks' predicted boxes (and moved masks) with detections; 0 across classes."""
        predicted = np.stack([t.kalman.box for t in tracks])  # (T, 4)
        iou = box_iou(predicted, boxes)
        if self.options.class_aware:
            iou[np.array([t.label for t in tracks])[:, None] != labels[None, :]] = 0.0
        if not (self.options.use_masks and crops is not None):
            return iou
        for i, t in enumerate(tracks):
            if t.crop is None or t.crop[2].size == 0:
                continue
            # The last mask, moved as the filter moved the box centre since that match.
            dx, dy = (predicted[i, :2] + predicted[i, 2:] - t.last_box[:2] - t.last_box[2:]) / 2
            moved = (t.crop[0] + round(float(dy)), t.crop[1] + round(float(dx)), t.crop[2])
            for j in np.flatnonzero(iou[i] > 0):  # pairs whose boxes do not meet stay at 0
                if crops[j][2].size:
                    iou[i, j] = (iou[i, j] + crop_iou(moved, crops[j])) / 2
        return iou


# ---- line crossings ----------------------------------------------------------------------


def parse_line(text: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` (pixels of the source frame) -> a tuple; ValueError, in one line, otherwise."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)):
        raise ValueError(f"a counting line is x1,y1,x2,y2 in pixels, got {text!r}")
    if values[:2] == values[2:]:
        raise ValueError(f"a counting line needs two different end points, got {text!r}")
    return values  # type: ignore[return-value]


def reference_point(box: np.ndarray) -> np.ndarray:
    """The point of a box that crosses lines: its bottom centre, (2,) x y."""
    return np.array([(box[0] + box[2]) / 2, box[3]], dtype=np.float64)


class LineCounter:
    """Counts tracks whose reference point crosses the segment A -> B = (x1, y1) -> (x2, y2).

    "in" is a crossing from the left of A -> B to its right as seen on screen (image y points
    down): for a line drawn left to right, moving down the picture is "in", up is "out"; for
    one drawn top to bottom, moving left is "in". Each track counts at most once per direction,
    so an object that jitters on the line is not counted again.
    """

    def __init__(self, line: tuple[float, float, float, float]) -> None:
        self.a = np.array(line[:2], dtype=np.float64)
        self.b = np.array(line[2:], dtype=np.float64)
        self.last: dict[int, np.ndarray] = {}  # track id -> its last point off the line
        self.counted: set[tuple[int, str]] = set()
        self.counts: dict[str, dict[str, int]] = {"in": {}, "out": {}}  # direction -> class name -> crossings

    def side(self, p: np.ndarray) -> float:
        """> 0 right of A -> B on screen, < 0 left, 0 on the line (z of (B - A) x (P - A))."""
        d, q = self.b - self.a, p - self.a
        return float(d[0] * q[1] - d[1] * q[0])

    def update(self, track_id: int, name: str, point: np.ndarray) -> str | None:
        """Move a track's reference point to ``point`` (2,); the direction if that crossed the line."""
        s = self.side(point)
        if s == 0:  # on the line: the crossing is decided by where it goes next
            return None
        previous, self.last[track_id] = self.last.get(track_id), point
        if previous is None or (self.side(previous) > 0) == (s > 0) or not self._within(previous, point):
            return None
        direction = "in" if s > 0 else "out"
        if (track_id, direction) in self.counted:
            return None
        self.counted.add((track_id, direction))
        self.counts[direction][name] = self.counts[direction].get(name, 0) + 1
        return direction

    def _within(self, p: np.ndarray, q: np.ndarray) -> bool:
        """True when the step p -> q (on both sides of the line) passes between A and B."""
        d, e = self.b - self.a, q - p
        denom = d[0] * e[1] - d[1] * e[0]
        # Where the step meets the line, as a fraction along A -> B (p, q are on opposite sides: denom != 0).
        u = ((p[0] - self.a[0]) * e[1] - (p[1] - self.a[1]) * e[0]) / denom
        return 0.0 <= u <= 1.0


# ---- for predict_video -------------------------------------------------------------------

TRAIL = 30  # reference points of a track drawn as its trail


class VideoTracking:
    """A ``Tracker`` (and a ``LineCounter``) over ``predict_video``'s results: ``update`` gives
    each detection's id for the JSON Lines, ``draw`` adds ids, trails and the line to a frame,
    ``summary`` counts objects per class and crossings per direction."""

    def __init__(
        self, options: TrackerOptions | None = None, line: tuple[float, float, float, float] | None = None
    ) -> None:
        self.tracker = Tracker(options)
        self.counter = LineCounter(line) if line is not None else None
        self.classes: dict[int, str] = {}  # track id -> class name (by its votes)
        self.names: dict[int, str] = {}  # label -> class name
        self.trails: dict[int, deque[tuple[float, float]]] = {}
        self._shown: list[tuple[int, np.ndarray]] = []  # (id, box) tracked in the frame being drawn

    def update(self, result: Any) -> list[int | None]:
        """Track one frame's ``Result``; each detection's track id, None for an untracked one."""
        from .masks import decode_one

        crops = [decode_one(r) for r in result.rles] if result.rles is not None else None
        ids = self.tracker.update(result.boxes, result.scores, result.labels, crops)
        for label, name in zip(result.labels.tolist(), result.class_names):
            self.names.setdefault(int(label), name or str(label))
        for t in self.tracker.tracks:  # an ended track keeps the class it had
            self.classes[t.id] = self.names.get(t.voted_label, str(t.voted_label))
        alive = {t.id for t in self.tracker.tracks}
        self.trails = {k: v for k, v in self.trails.items() if k in alive}
        self._shown = []
        for i, track_id in enumerate(ids.tolist()):
            if track_id < 0 or track_id in {k for k, _ in self._shown}:  # a duplicate: its best detection came first
                continue
            point = reference_point(result.boxes[i])
            self.trails.setdefault(track_id, deque(maxlen=TRAIL)).append((float(point[0]), float(point[1])))
            self._shown.append((track_id, result.boxes[i]))
            if self.counter is not None:
                self.counter.update(track_id, self.classes[track_id], point)
        return [None if k < 0 else k for k in ids.tolist()]

    def draw(self, picture: Image.Image) -> Image.Image:
        """Draw the line with its counts, each tracked object's "#id" and trail onto ``picture``
        (the frame at full size, as ``Result.plot(max_size=None)`` gives it); returns it."""
        from .results import label_color

        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default()
        width = max(2, round(0.003 * (picture.width + picture.height)))
        for track_id, box in self._shown:
            color = label_color(track_id)
            trail = list(self.trails.get(track_id, ()))
            if len(trail) > 1:
                draw.line(trail, fill=color, width=width)
            text = f"#{track_id}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            x, y = float(box[0]), float(box[3]) - (bottom - top) - 4  # inside the box, bottom left
            draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 4), fill=color)
            draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0), font=font)
        if self.counter is not None:
            a, b = self.counter.a, self.counter.b
            draw.line([tuple(a), tuple(b)], fill=(255, 255, 0), width=width)
            n_in, n_out = (sum(self.counter.counts[k].values()) for k in ("in", "out"))
            draw.text((float(a[0]) + 4, float(a[1]) + 4), f"in {n_in}  out {n_out}", fill=(255, 255, 0), font=font)
        return picture

    def summary(self) -> dict[str, Any]:
        """{"objects": class name -> tracks, "tracks": all tracks; with a line also "line":
        [x1, y1, x2, y2] and "crossings": {"in": class -> n, "out": class -> n}}."""
        objects: dict[str, int] = {}
        for name in self.classes.values():
            objects[name] = objects.get(name, 0) + 1
        out: dict[str, Any] = {"tracks": len(self.classes), "objects": dict(sorted(objects.items()))}
        if self.counter is not None:
            out["line"] = [*self.counter.a.tolist(), *self.counter.b.tolist()]
            out["crossings"] = {k: dict(sorted(v.items())) for k, v in self.counter.counts.items()}
        return out

    def write(self, path: Path, frames_processed: int, frames_dropped: int) -> dict[str, Any]:
        """Write ``summary()`` with the frame counts to ``path`` (JSON, atomically); returns what was written."""
        from ..files import write_json

        out = {
            "written_by": SUMMARY_TAG,
            "frames_processed": frames_processed,
            "frames_dropped": frames_dropped,
            **self.summary(),
        }
        write_json(out, path, indent=1)
        return out


SUMMARY_TAG = "maskrcnn predict --track"  # how a rerun tells its own summary from a user's file


def written_by_tracking(path: Path) -> bool:
    """True for a summary that ``VideoTracking.write`` wrote (a rerun may replace it)."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("written_by") == SUMMARY_TAG
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return False


def summary_path(out_dir: Path, name: str) -> Path:
    """Where ``predict_video --track`` writes a source's summary: ``<out>/<name>.tracks.json``."""
    return Path(out_dir) / f"{name}.tracks.json"
