"""What the driver ships to other Ray processes, kept free of TensorFlow imports.

Ray pickles the train function and the callbacks by reference, so the Train controller imports the
modules they live in; importing TensorFlow there would cost seconds per run for nothing. The
workers import the real loop (:mod:`pneumonet.training.worker`) when they start.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import UserCallback

log = logging.getLogger(__name__)


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """The TensorflowTrainer's per-worker function: :func:`pneumonet.training.worker.train_worker`."""
    from pneumonet.training.worker import train_worker

    train_worker(spec)


class RelayCallback(UserCallback):
    """Runs in the Train controller: puts every report (one metrics dict per rank) into a Ray queue
    that the driver drains (:class:`pneumonet.training.driver.EpochRelay`)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def after_report(self, run_context, metrics, checkpoint) -> None:
        try:
            self.target.put([dict(m) for m in metrics], timeout=30)
        except Exception as exc:  # noqa: BLE001 - the relay is for progress and logging; never fail training over it
            log.warning("epoch relay: %s", exc)
