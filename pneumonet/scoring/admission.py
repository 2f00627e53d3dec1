"""Admission control of one replica: refuse at the door a request that would wait too long.

A request that cannot start its model call within ``serve.queue_timeout_s`` is better refused at
once (503, the client retries or goes elsewhere) than after the wait, having cost the decoding
and made every request behind it later. The replica knows how many images wait for a model call
and how fast recent model calls were, so it can tell on arrival; the hard deadline in
:mod:`pneumonet.scoring.online` still catches a guess that was too kind. Framework-free, so it is
tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Admission:
    """Images waiting for a model call, and the recent wall-clock seconds per image of the model."""

    queue_timeout_s: float
    max_batch_size: int
    smoothing: float = 0.2  # weight of the latest model call in the moving average
    waiting: int = 0
    seconds_per_image: float | None = None  # None until a first model call was timed

    def expected_wait(self, images: int = 1) -> float:
        """Seconds until the last batch of ``images`` more would start its model call: every image
        ahead of it takes what recent ones took. (On a CPU a model's time per image hardly depends
        on the batch size, and Serve forms small batches while a model call runs, so counting
        images, not full batches, is what matches the waits measured in benchmarks/RESULTS-serve.md.)"""
        if self.seconds_per_image is None:
            return 0.0
        return (self.waiting + max(0, images - self.max_batch_size)) * self.seconds_per_image

    def admits(self, images: int = 1) -> bool:
        return self.expected_wait(images) <= self.queue_timeout_s

    def queued(self, images: int = 1) -> None:
        self.waiting += images

    def left(self, images: int = 1) -> None:
        """Images that leave the queue without a model call (out of time, caller gone)."""
        self.waiting = max(0, self.waiting - images)

    def started(self, images: int) -> None:
        self.left(images)

    def timed(self, images: int, seconds: float) -> None:
        """A model call on ``images`` took ``seconds``."""
        latest = seconds / max(1, images)
        previous = self.seconds_per_image
        self.seconds_per_image = latest if previous is None else previous + self.smoothing * (latest - previous)
