"""``Newest``: a reader that keeps only the newest frame, against a synthetic fast source."""

from __future__ import annotations

import time

import pytest

from maskrcnn.inference.live import Newest


def test_a_slow_consumer_gets_the_newest_item_and_the_drops_are_counted():
    produced = [-1]

    def source():
        for i in range(60):
            time.sleep(0.002)
            produced[0] = i
            yield i

    newest = Newest(source())
    taken, behind = [], []
    for item in newest:
        behind.append(produced[0] - item)  # items produced since this one: 0, or 1 in the hand-over
        taken.append(item)
        time.sleep(0.02)  # ten times slower than the source
    assert taken == sorted(set(taken)) and taken[-1] == 59 and len(taken) < 45
    assert max(behind) <= 1  # never queued behind
    assert newest.dropped_before == [b - a - 1 for a, b in zip([-1, *taken], taken)]
    assert newest.dropped == 60 - len(taken)


def test_a_fast_consumer_drops_nothing():
    newest = Newest(iter(range(5)))
    taken = list(newest)
    assert taken[-1] == 4 and newest.dropped == 5 - len(taken) and sum(newest.dropped_before) == newest.dropped


def test_an_error_in_the_source_is_raised_after_the_items_before_it():
    def source():
        yield 1
        time.sleep(0.05)
        raise OSError("the camera went away")

    taken = []
    with pytest.raises(OSError, match="camera went away"):
        for item in Newest(source()):
            taken.append(item)  # noqa: PERF402  (the items before the error are what is checked)
    assert taken == [1]


def test_stopping_early_stops_the_reader():
    def endless():
        i = 0
        while True:
            time.sleep(0.001)
            yield i
            i += 1

    newest = Newest(endless())
    for item in newest:
        if item > 3:
            break
    newest.close()
    assert not newest._thread.is_alive()
