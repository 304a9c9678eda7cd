"""The model's one worker thread: requests that arrive together run as one batch.

HTTP handlers ``submit`` decoded images and await the returned future; the worker takes the
first waiting job, then every job that arrives within ``max_wait_s`` up to ``max_batch``, and
runs them through ``model.predict`` in one call per set of request options (score threshold
and tiling differ per request; ``predict`` itself groups images of the same padded size into
one forward pass, so an image's detections never depend on what it was batched with). A job
whose client has gone away is cancelled in the queue and never runs.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..inference.options import PredictOptions
from ..inference.results import Result

log = logging.getLogger(__name__)


@dataclass
class Job:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    options: PredictOptions  # what the request set; requests batch together only when these agree
    future: Future


class BatchWorker:
    """Owns the model; ``submit`` from any thread, ``close`` to stop after the queued jobs."""

    def __init__(self, model, max_batch: int = 4, max_wait_s: float = 0.005, precision: str = "fp32") -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.precision = precision
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # forward calls made, for /health and the tests
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name="maskrcnn-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray, options: PredictOptions) -> Future:
        future: Future = Future()
        self.jobs.put(Job(image, options, future))
        return future

    def pending(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join()

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and the jobs that arrive within ``max_wait_s`` (at most ``max_batch``); True when told to stop."""
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self.jobs.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # client gone: skipped
            groups: dict[PredictOptions, list[Job]] = {}
            for job in live:
                groups.setdefault(job.options, []).append(job)
            for options, jobs in groups.items():
                self._run(options, jobs)

    def _run(self, options: PredictOptions, jobs: list[Job]) -> None:
        try:
            run = options.replace(batch_size=len(jobs), precision=self.precision)
            results: list[Result] = self.model.predict([job.image for job in jobs], **dataclasses.asdict(run))
        except Exception as e:  # noqa: BLE001  never let the worker die: every waiting client gets the error
            log.exception("prediction failed")
            for job in jobs:
                job.future.set_exception(e)
            return
        self.batches += 1
        self.images += len(jobs)
        for job, result in zip(jobs, results):
            job.future.set_result(result)
