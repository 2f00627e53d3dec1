"""Where scoring runs: the Ray cluster of a RayJob/RayService, or a local one for this machine."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from pneumonet import errors

# Task results smaller than this go back inline to their owner, the driver, and live in its memory
# until consumed. Ray's default (100 KiB) holds there every block of URIs (a listing page, a shuffle
# shard): measured +274 MiB of driver memory for the anti-join of 10^6 files, +37 MiB at 8 KiB,
# which leaves only Ray Data's block metadata inline. A RayJob sets it in its pods' environment
# (k8s/base/score/rayjob.yaml); a local Ray gets it from init_ray.
INLINE_RESULT_BYTES = 8192
INLINE_RESULT_ENV = "RAY_max_direct_call_object_size"

# How a Pneumonet error raised inside a Ray task reads in the driver's exception text. Parsed
# because Ray Data hands the driver only that text, not the task's exception object or its kind.
_REMOTE_ERROR = re.compile(r"^pneumonet\.errors\.(\w+): (.+)$", re.MULTILINE)

# The environment of every Ray process of the online endpoint, set where Ray starts (the
# RayService's containers; `pneumonet serve` for its local Ray). tests/test_k8s.py holds the
# RayService to it; the figures behind it are in benchmarks/RESULTS-serve.md.
SERVE_ENV = {
    # Serve's proxy answers 503 + Retry-After, not a bare 500, for a request whose replica died.
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pneumonet.scoring.proxy:middlewares",
    # Handlers on the replica's own event loop and the proxy's router on the proxy's, not each on a
    # second thread: two thread hops less per request (one back-to-back pair: -17% CPU per request;
    # not confirmed by later, noisier runs). The
    # endpoint never blocks its loop (decoding and the model run in threads).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def set_serve_env() -> None:
    """SERVE_ENV in this process, for a local Ray started from it; what is set already wins."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def init_ray() -> None:
    """Scoring's Ray (:func:`pneumonet.local_ray.connect`): a local one gets :data:`INLINE_RESULT_BYTES`
    and no dashboard (nothing in scoring asks the State API)."""
    from pneumonet import local_ray

    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(INLINE_RESULT_ENV, str(INLINE_RESULT_BYTES))
    local_ray.connect(dashboard=False)


@contextlib.contextmanager
def remote_errors() -> Iterator[None]:
    """Re-raise a Pneumonet error that a Ray Data task raised (a manifest with blank rows, an output
    of another model) as itself, so the doors report it like one raised on the driver; Ray wraps
    it in ``UserCodeException`` and keeps only its text."""
    import ray

    try:
        yield
    except ray.exceptions.RayError as exc:
        found = _REMOTE_ERROR.search(str(exc))
        kind = getattr(errors, found.group(1), None) if found else None
        if isinstance(kind, type) and issubclass(kind, errors.PneumonetError):
            raise kind(found.group(2)) from exc
        raise
