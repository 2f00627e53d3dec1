"""The one private Ray name Pneumonet uses, confined here; tests/test_training.py fails loudly when Ray moves it.

Ray Train V2 logs every ``ray.train.report`` call with all its metrics at INFO on each worker, under
a logger named after its source file (``ray/train/v2/_internal/execution/context.py``); Ray has no
public setting for that logger (``ray.train.LoggingConfig`` sets the level of Ray Train's library
logs in the controller, not this one). A worker quietens it with :func:`quiet_report_logs`.
"""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution import context as _train_context

REPORT_LOGGER = _train_context.__file__  # the logger's name


def quiet_report_logs() -> None:
    """Only warnings from Ray Train's per-report logger in this process."""
    logging.getLogger(REPORT_LOGGER).setLevel(logging.WARNING)
