"""Data prefetch: the next steps' batches are prepared in a background thread while the current step runs.

A batch is a pure function of (step, cursor) (the task's `local_batch`; the cursor sequence is known in advance:
`next_cursor`), so the prefetcher computes batches for the positions that will come and hands one over when the
trainer asks for exactly that (step, cursor). Anything else (a resume, a rollback to an earlier checkpoint) drops the
queue and starts again from the asked-for position, so results are the same with or without prefetch and resume
stays exact. The queue is bounded (`depth` batches); `wait_s` is the time the trainer spent blocked on data.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

Key = tuple[int, int]  # (step, cursor)


class Prefetcher:
    def __init__(self, make: Callable[[int, int], object], advance: Callable[[int], int], depth: int = 2):
        self.make, self.advance, self.depth = make, advance, depth
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next: Key | None = None  # the key the next queued batch has

    def get(self, step: int, cursor: int) -> tuple[object, float]:
        """(the batch of (step, cursor), seconds spent waiting for it)."""
        t0 = time.perf_counter()
        if self._next != (step, cursor):
            self._restart(step, cursor)
        key, batch, err = self._queue.get()
        if err is not None:
            raise err
        self._next = (key[0] + 1, self.advance(key[1]))
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:  # unblock a producer waiting on a full queue
            while not self._queue.empty():
                self._queue.get_nowait()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = self._queue = None

    def _restart(self, step: int, cursor: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(step, cursor), name="vidtron-prefetch", daemon=True)
        self._thread.start()
        self._next = (step, cursor)

    def _produce(self, step: int, cursor: int) -> None:
        q, stop = self._queue, self._stop
        while not stop.is_set():
            try:
                item = ((step, cursor), self.make(step, cursor), None)
            except Exception as err:  # handed to the trainer, raised where the batch was wanted
                item = ((step, cursor), None, err)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step, cursor = step + 1, self.advance(cursor)
