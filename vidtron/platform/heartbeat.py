"""Heartbeats: every rank records its step progress, and a rank that makes none for trainer.hang_timeout_s is
reported (an event with its rank and host) and exits, so the launcher restarts the group from the last checkpoint
long before the collective timeout would end it (and with the culprit named, which a timeout does not).

Each rank writes `<run_dir>/heartbeats/rank_<r>.json` ({"step", "time", "host", "pid", "step_time_s"}) after each
step; a watchdog thread of the same rank checks the age of its last beat. Waiting inside a collective for a hung
peer counts as no progress too, so every rank of a stuck group reports; the first `hang` event (and the heartbeat
files: the rank whose step is behind) names the one that stopped.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vidtron.platform.metrics import log_event

HANG_EXIT_CODE = 43


class Heartbeat:
    def __init__(self, run_dir, rank: int, timeout_s: float, on_hang: Callable[[int], None] = os._exit):
        self.path = Path(run_dir) / "heartbeats" / f"rank_{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.rank, self.timeout_s, self.on_hang = run_dir, rank, timeout_s, on_hang
        self.host = socket.gethostname()
        self._last, self._step = time.monotonic(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vidtron-heartbeat", daemon=True)
        if timeout_s > 0:
            self._thread.start()

    def beat(self, step: int, step_time_s: float = 0.0) -> None:
        """Progress: this rank finished `step` (also call after long non-step work: checkpoints, rollbacks)."""
        self._last, self._step = time.monotonic(), step
        record = {"step": step, "time": time.time(), "host": self.host, "pid": os.getpid(), "step_time_s": step_time_s}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                fields = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self._step}
                log_event(self.run_dir, "hang", waited_s=round(waited, 1), **fields)
                self.on_hang(HANG_EXIT_CODE)
                return


def stragglers(step_times: list[float], ratio: float) -> list[int]:
    """Ranks whose step time exceeds `ratio` x the median of all ranks' (empty with fewer than 2 ranks)."""
    if len(step_times) < 2:
        return []
    median = sorted(step_times)[len(step_times) // 2]
    return [r for r, t in enumerate(step_times) if median > 0 and t > ratio * median]
