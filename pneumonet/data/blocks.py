"""A block of files decoded inside a Ray Data task: the one ``map_batches`` decoder of training's ingest
and of batch scoring.

Every file of the block becomes a row with the model's pixels, or with zeros, its ``error`` and its
``error_kind`` (:mod:`pneumonet.errors`): a bad file costs its row, never the task. Files are read
:data:`READ_THREADS` at a time (S3 latency) and decoded one by one on the task's one CPU, so Ray's CPU
accounting holds; with ``max_seconds`` each decode runs in a child process killed when late
(:mod:`pneumonet.data.sandbox`). Columns named in ``keep`` (training's ``index`` and ``label``) pass
through unchanged.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pneumonet import storage
from pneumonet.data.images import not_image_reason
from pneumonet.errors import PneumonetError

log = logging.getLogger(__name__)

# Files read concurrently inside one decode task (S3 latency); decoding itself stays on the
# task's one CPU so Ray's CPU accounting holds.
READ_THREADS = 8


def _read_or_error(uri: str, max_bytes: int) -> bytes | PneumonetError:
    """The file's bytes, or why it is skipped, unreadable or over ``max_bytes``."""
    reason = not_image_reason(uri)
    if reason:
        return PneumonetError(reason, kind="not_image")
    try:
        return storage.read_bytes(uri, max_bytes)
    except PneumonetError as exc:
        return exc


@functools.cache
def _decoder(max_seconds: float) -> Any:
    """The decoder child of this Ray worker process, reused by every decode task it runs."""
    from pneumonet.data.sandbox import DecoderPool

    return DecoderPool(1, max_seconds)


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    max_pixels: int,
    max_bytes: int,
    max_seconds: float | None,
    keep: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """URIs → model-ready pixels (see the module docstring): ``uri``, ``image``, ``error``, ``error_kind``
    and the ``keep`` columns. Decoding runs in a child process killed after ``max_seconds``, or here when
    that is None."""
    from pneumonet.data.images import load_image

    decode = _decoder(max_seconds).load_image if max_seconds else load_image
    uris = [str(uri) for uri in batch["uri"]]
    images = np.zeros((len(uris), size, size, 1), np.uint8)
    errors = [""] * len(uris)
    kinds = [""] * len(uris)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="pneumonet-read") as pool:
        # Windows of READ_THREADS files: concurrent reads, bounded raw bytes in memory.
        for start in range(0, len(uris), READ_THREADS):
            window = uris[start : start + READ_THREADS]
            for index, data in enumerate(pool.map(_read_or_error, window, [max_bytes] * len(window)), start):
                try:
                    if isinstance(data, PneumonetError):
                        raise data
                    images[index] = decode(data, uris[index], size, max_pixels, max_bytes)
                except PneumonetError as exc:
                    errors[index], kinds[index] = str(exc), exc.kind
                except Exception as exc:  # a decoder bug must cost one row, not an overnight job
                    log.exception("unexpected error decoding %s", uris[index])
                    errors[index] = f"{uris[index]}: unexpected {type(exc).__name__} while decoding: {exc}"
                    kinds[index] = "decoder_crash"
    return {**{name: batch[name] for name in keep}, "uri": np.asarray(uris, dtype=object), "image": images, "error": np.asarray(errors, dtype=object),
            "error_kind": np.asarray(kinds, dtype=object)}  # fmt: skip
