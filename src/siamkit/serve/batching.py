"""Dynamic batching: the images of concurrent requests go through the model in one forward pass.

Requests put their images (uint8 [C, H, W] at the model's size) on a queue and await a future. One worker thread
takes the first waiting request, then keeps taking requests until the batch holds ``max_batch`` images or
``max_wait_ms`` have passed since the first arrived, embeds them all at once and hands each request its rows.
The model runs only in that thread, so the event loop stays free to accept and decode other requests meanwhile.
``max_batch=1`` turns batching off (one image per forward pass). ``stats`` counts forward passes by batch size.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

_STOP = object()


@dataclass
class _Job:
    pixels: np.ndarray  # [n, C, H, W]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Batcher:
    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch >= 1 and max_wait_ms >= 0")
        self.embed, self.max_batch, self.max_wait = embed, max_batch, max_wait_ms / 1000.0
        self.jobs: queue.Queue = queue.Queue()
        self.carried: _Job | None = None  # a job that did not fit the last batch: it opens the next one
        self.batch_sizes: Counter = Counter()  # images per forward pass -> how many passes
        self.waiting = 0  # images queued, not yet embedded
        self.stats_lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="siamkit-batcher", daemon=True)
        self.thread.start()

    async def run(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings [n, D] of ``pixels`` [n, C, H, W], computed with whatever other requests are waiting."""
        loop = asyncio.get_running_loop()
        job = _Job(np.asarray(pixels), loop, loop.create_future())
        with self.stats_lock:
            self.waiting += len(job.pixels)
        self.jobs.put(job)
        return await job.future

    def stats(self) -> dict:
        with self.stats_lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            waiting = self.waiting
        return {"forward_passes": sum(sizes.values()), "images": sum(k * v for k, v in sizes.items()),
                "waiting_images": waiting,
                "batch_sizes": {str(k): v for k, v in sizes.items()}, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000.0}

    def close(self) -> None:
        """Finish the jobs queued so far, then stop the worker."""
        self.jobs.put(_STOP)
        self.thread.join()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` and the jobs that join it within the wait, up to max_batch images; and whether to stop."""
        batch, images = [first], len(first.pixels)
        deadline = time.monotonic() + self.max_wait
        while images < self.max_batch:
            try:
                left = deadline - time.monotonic()
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            if images + len(job.pixels) > self.max_batch:
                self.carried = job
                break
            batch.append(job)
            images += len(job.pixels)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first, self.carried = self.carried or self.jobs.get(), None
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            self._run(batch)
        if self.carried is not None:  # what was queued before close(): still answered
            self._run([self.carried])
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                self._run([job])

    def _run(self, batch: list[_Job]) -> None:
        pixels = np.concatenate([job.pixels for job in batch])
        with self.stats_lock:
            self.waiting -= len(pixels)
        try:
            rows = self.embed(pixels)
        except BaseException as e:  # every waiting request hears of it; the worker keeps serving
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, e)
            return
        with self.stats_lock:
            self.batch_sizes[len(pixels)] += 1
        start = 0
        for job in batch:
            n = len(job.pixels)
            job.loop.call_soon_threadsafe(_settle, job.future, rows[start:start + n], None)
            start += n


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
