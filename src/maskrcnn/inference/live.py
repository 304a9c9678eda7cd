"""Live sources (cameras, streams): read on a thread, keep only the newest frame.

A camera does not wait for the model: if frames were queued, a model slower than the source
would fall further behind with every frame (and memory would grow without bound). ``Newest``
decodes the source on a reader thread into a one-frame slot; each new frame replaces an
unread one, which is counted as dropped; the model always gets the newest frame there is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_JOIN_S = 5.0  # how long closing waits for the reader to notice (one frame's decoding)


class Newest(Generic[T]):
    """Iterate ``source`` on a thread; iterating this yields the newest item not yet taken.

    ``dropped`` counts the items replaced before they were taken; ``dropped_before[k]`` is how
    many were dropped just before the ``k``-th item taken (0-based). An error in ``source`` is
    raised by this iterator after the items taken before it; ``close`` stops the reader.
    """

    def __init__(self, source: Iterator[T]) -> None:
        self._source = source
        self._cond = threading.Condition()
        self._item: tuple[T] | None = None  # the slot: at most one frame waits
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.dropped = 0
        self._unread = 0  # dropped since the last item taken
        self.dropped_before: list[int] = []
        self._thread = threading.Thread(target=self._read, name="maskrcnn-live-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in self._source:
                with self._cond:
                    if self._item is not None:
                        self.dropped += 1
                        self._unread += 1
                    self._item = (item,)
                    self._cond.notify()
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001  handed to the consumer, which raises it
            self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify()

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._item is not None or self._done)
                    if self._item is None:  # finished and every frame taken
                        break
                    (item,), self._item = self._item, None
                    self.dropped_before.append(self._unread)
                    self._unread = 0
                yield item
            if self._error is not None:
                raise self._error
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader (it finishes the frame it is decoding); safe to call twice."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_S)
