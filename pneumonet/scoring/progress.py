"""Progress of a scoring run that a person can follow: one log line every few seconds, the same in W&B.

    progress: 412,000/1,000,000 files this run (41.2%), 1,234 already done; 1,873 images/s
    (2,010 over the last 60 s); 17 failed; ETA 5m12s

The counters advance when a part lands (its rows are then durable), from a background thread so
the line keeps coming at a steady interval while a slow part is in flight; that is what
``kubectl logs`` and the Ray dashboard's job log show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from pneumonet.console import duration

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0


class Progress:
    """Counters of one run; as a context manager, reports every ``interval`` seconds and once at the end."""

    def __init__(self, total: int, already: int, run: Any, interval: float) -> None:
        self.total, self.already, self.run, self.interval = total, already, run, interval
        self.done = self.failures = self.parts = 0
        self.started = time.monotonic()
        self.first_part: tuple[float, int] | None = None  # (time, files done) when the first part landed
        self.last_part: tuple[float, int] | None = None
        self._window: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pneumonet-progress", daemon=True)

    def add(self, rows: int, failures: int) -> None:
        """A part of ``rows`` rows (``failures`` of them errors) has landed."""
        with self._lock:
            self.done += rows
            self.failures += failures
            self.parts += 1
            now = time.monotonic()
            self.first_part = self.first_part or (now, self.done)
            self.last_part = (now, self.done)

    def steady_rate(self) -> float | None:
        """Images/s from the first part's landing to the last one's: start-up left out."""
        if self.first_part is None or self.last_part is None or self.last_part[0] <= self.first_part[0]:
            return None
        return (self.last_part[1] - self.first_part[1]) / (self.last_part[0] - self.first_part[0])

    def snapshot(self) -> dict[str, float | int | None]:
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.started
            self._window.append((now, self.done))
            while len(self._window) > 2 and now - self._window[1][0] >= WINDOW_SECONDS:
                self._window.popleft()
            since, done_then = self._window[0]
            recent = (self.done - done_then) / (now - since) if now > since else None
            rate = self.done / elapsed if elapsed > 0 else None
            pace = recent or rate
            eta = (self.total - self.done) / pace if pace else None
            return {"files_done": self.done, "files_total": self.total, "already_done": self.already,
                    "failures": self.failures, "parts": self.parts, "images_per_second": rate,
                    "images_per_second_recent": recent, "eta_seconds": eta, "elapsed_seconds": elapsed}  # fmt: skip

    def line(self, values: dict[str, Any]) -> str:
        share = f" ({100 * values['files_done'] / values['files_total']:.1f}%)" if values["files_total"] else ""
        rate = values["images_per_second"] or 0.0
        recent = values["images_per_second_recent"]
        eta = values["eta_seconds"]
        return (
            f"progress: {values['files_done']:,}/{values['files_total']:,} files this run{share}, "
            f"{values['already_done']:,} already done; {rate:,.1f} images/s"
            + (f" ({recent:,.1f} over the last {WINDOW_SECONDS:.0f} s)" if recent is not None else "")
            + f"; {values['failures']:,} failed; ETA {duration(eta) if eta is not None and values['files_done'] else 'unknown'}"
        )

    def report(self) -> None:
        values = self.snapshot()
        log.info(self.line(values))
        self.run.log({key: value for key, value in values.items() if value is not None})

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval):
            self.report()

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._thread.join()
        self.report()
