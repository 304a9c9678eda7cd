"""The tracker and the line counter on hand-made sequences whose true identities are known."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from maskrcnn.inference.tracking import (
    KalmanBox,
    LineCounter,
    Tracker,
    TrackerOptions,
    box_iou,
    crop_iou,
    parse_line,
)


def square(x: float, y: float, side: float = 40) -> list[float]:
    return [x, y, x + side, y + side]


def run(tracker: Tracker, frames: list[list[tuple[list[float], float, int]]]) -> list[list[int]]:
    """Feed frames of (box, score, label) detections; the ids of each frame's detections."""
    out = []
    for dets in frames:
        boxes = np.array([d[0] for d in dets], dtype=np.float32).reshape(-1, 4)
        out.append(tracker.update(boxes, np.array([d[1] for d in dets]), np.array([d[2] for d in dets])).tolist())
    return out


def test_box_iou_matches_hand_computed_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], dtype=np.float64)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float64)
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0, 1], [0, 0, 0]])


def test_crop_iou_equals_pycocotools_on_the_full_frames():
    rng = np.random.default_rng(0)
    for _ in range(20):
        crops, frames = [], []
        for _ in range(2):
            y, x, h, w = rng.integers(0, 30, 4) + [0, 0, 1, 1]
            c = rng.random((h, w)) > 0.4
            f = np.zeros((64, 64), dtype=np.uint8)
            f[y : y + h, x : x + w] = c
            crops.append((int(y), int(x), c))
            frames.append(mask_util.encode(np.asfortranarray(f)))
        expected = (
            mask_util.iou([frames[0]], [frames[1]], [0])[0, 0] if crops[0][2].any() and crops[1][2].any() else 0.0
        )
        assert crop_iou(*crops) == pytest.approx(expected)


def test_the_kalman_filter_predicts_constant_motion():
    kf = KalmanBox.start(np.array(square(0, 0)))
    for t in range(1, 30):
        kf.predict()
        kf.correct(np.array(square(5 * t, 3 * t)))
    kf.predict()
    np.testing.assert_allclose(kf.box, square(150, 90), atol=0.5)


def test_objects_that_cross_keep_their_ids():
    """Two 40-px squares of one class, 16 px a frame, on one row, in opposite directions.
    At frame 10 the left one's last box (144..184) overlaps the other's new box (136..176,
    IoU 0.67) more than its own (160..200, IoU 0.43): without the motion model they swap."""
    frames = [[(square(16 * t, 50), 0.9, 1), (square(296 - 16 * t, 50), 0.9, 1)] for t in range(20)]
    ids = run(Tracker(), frames)
    assert all(i == [1, 2] for i in ids), ids


@pytest.mark.parametrize("gap", [1, 5])
def test_an_object_missed_for_some_frames_keeps_its_id(gap):
    frames = [[(square(10 * t, 20), 0.9, 1)] if not 5 <= t < 5 + gap else [] for t in range(15)]
    ids = run(Tracker(), frames)
    assert [i for i in ids if i] == [[1]] * (15 - gap)  # 50 px away after 5 frames: only the prediction finds it


def test_a_track_lost_for_longer_than_max_lost_ends():
    frames = [[(square(10 * t, 20), 0.9, 1)] if not 5 <= t < 10 else [] for t in range(15)]
    ids = run(Tracker(TrackerOptions(max_lost=3)), frames)
    assert [i for i in ids if i] == [[1]] * 5 + [[2]] * 5


def test_low_scores_continue_tracks_but_never_start_one():
    frames = []
    for t in range(8):
        score = 0.3 if t in (3, 4) else 0.9  # partly hidden: the score dips
        frames.append([(square(8 * t, 20), score, 1), (square(200, 200), 0.3, 1)])  # a lone low score: no id
    ids = run(Tracker(), frames)
    assert ids == [[1, -1]] * 8


def test_a_low_score_detection_must_fit_closely():
    tracker = Tracker()
    run(tracker, [[(square(0, 0), 0.9, 1)]])
    # IoU with the track is 30 * 40 / (50 * 40) = 0.6 at a high score, but a low score needs 0.5 ...
    assert run(tracker, [[(square(10, 0), 0.3, 1)]]) == [[1]]
    tracker = Tracker()
    run(tracker, [[(square(0, 0), 0.9, 1)]])
    # ... and 0.33 is enough for a high score but not for a low one.
    assert run(tracker, [[(square(20, 0), 0.3, 1)]]) == [[-1]]
    tracker = Tracker()
    run(tracker, [[(square(0, 0), 0.9, 1)]])
    assert run(tracker, [[(square(20, 0), 0.9, 1)]]) == [[1]]


def test_an_object_whose_class_flips_keeps_its_id_and_takes_its_most_confident_class():
    tracker = Tracker()  # a car called a truck in the second frame, as detectors do
    assert run(tracker, [[(square(0, 0), 0.9, 3)], [(square(2, 0), 0.6, 8)], [(square(4, 0), 0.8, 3)]]) == [[1]] * 3
    assert tracker.tracks[0].voted_label == 3 and tracker.tracks[0].votes == pytest.approx({3: 1.7, 8: 0.6})


def test_class_aware_matching_keeps_classes_apart():
    ids = run(
        Tracker(TrackerOptions(class_aware=True)),
        [[(square(0, 0), 0.9, 1)], [(square(2, 0), 0.9, 2)], [(square(4, 0), 0.9, 1)]],
    )
    assert ids == [[1], [2], [1]]


def test_one_object_detected_under_two_classes_is_one_track():
    """Per-class NMS keeps a "car" and a "truck" box on one vehicle: the second gets the
    first one's id (it is the same object), and starts no track; a car beside it does."""
    frames = [
        [(square(5 * t, 0), 0.9, 3), (square(5 * t + 1, 1), 0.6, 8), (square(5 * t, 100), 0.7, 8)] for t in range(4)
    ]
    tracker = Tracker()
    assert run(tracker, frames) == [[1, 1, 2]] * 4
    assert [t.voted_label for t in tracker.tracks] == [3, 8]


def test_masks_tell_apart_objects_whose_boxes_coincide():
    """Two triangles of one 40 x 40 box (upper left and lower right): box IoU cannot tell
    them apart, mask IoU can; the detections come in the other order in the second frame."""
    upper = np.triu(np.ones((40, 40), dtype=bool))[:, ::-1]  # upper-left triangle
    lower = ~upper
    box = np.array([square(0, 0)] * 2, dtype=np.float32)
    tracker = Tracker()
    first = tracker.update(box, np.array([0.9, 0.8]), np.array([1, 1]), [(0, 0, upper), (0, 0, lower)])
    second = tracker.update(box, np.array([0.9, 0.8]), np.array([1, 1]), [(0, 0, lower), (0, 0, upper)])
    assert first.tolist() == [1, 2] and second.tolist() == [2, 1]


@pytest.mark.parametrize("bad", [{"high_thresh": 1.5}, {"low_thresh": 0.6, "high_thresh": 0.5}, {"max_lost": -1}])
def test_bad_tracker_options_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="tracker"):
        TrackerOptions(**bad)


# ---- line crossings ----------------------------------------------------------------------


def walk(counter: LineCounter, track: int, points: list[tuple[float, float]], name: str = "car") -> list[str | None]:
    return [counter.update(track, name, np.array(p, dtype=np.float64)) for p in points]


def test_a_line_drawn_left_to_right_counts_moving_down_as_in():
    counter = LineCounter((0, 50, 100, 50))
    assert walk(counter, 1, [(50, 40), (50, 45), (50, 60)]) == [None, None, "in"]
    assert walk(counter, 2, [(30, 70), (30, 20)]) == [None, "out"]
    assert counter.counts == {"in": {"car": 1}, "out": {"car": 1}}


def test_a_line_drawn_top_to_bottom_counts_moving_left_as_in():
    counter = LineCounter((80, 0, 80, 96))
    assert walk(counter, 1, [(100, 50), (60, 50)]) == [None, "in"]
    assert walk(counter, 2, [(60, 10), (100, 10)]) == [None, "out"]


def test_passing_beyond_the_ends_of_the_segment_is_not_a_crossing():
    counter = LineCounter((0, 50, 100, 50))
    assert walk(counter, 1, [(150, 40), (150, 60), (120, 40)]) == [None, None, None]
    assert walk(counter, 2, [(110, 40), (90, 60)]) == [None, "in"]  # the step meets the line at x = 100


def test_each_track_counts_once_per_direction_and_touching_the_line_is_not_crossing():
    counter = LineCounter((0, 50, 100, 50))
    path = [(50, 40), (50, 50), (50, 40), (50, 50), (50, 60), (50, 40), (50, 60), (50, 40)]
    assert walk(counter, 1, path) == [None, None, None, None, "in", "out", None, None]
    assert walk(counter, 2, [(10, 40), (10, 60)], name="bus") == [None, "in"]
    assert counter.counts == {"in": {"car": 1, "bus": 1}, "out": {"car": 1}}


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "1,2,1,2", "1,2,3,nan"])
def test_a_bad_count_line_is_a_one_line_error(text):
    with pytest.raises(ValueError, match="line"):
        parse_line(text)
