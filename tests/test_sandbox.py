"""Decoding in child processes under a deadline (pneumonet.data.sandbox): the same pixels and the
same refusals as in-process, a hostile file stopped at data.max_decode_seconds, a crash contained."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hostile import many_scans_jpeg
from PIL import Image

from pneumonet.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, load_image
from pneumonet.data.sandbox import DecoderPool
from pneumonet.errors import ImageDecodeError

LIMITS = (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)


def png(seed: int, dtype: type = np.uint8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096 if dtype is np.uint16 else 256, (40, 52)).astype(dtype)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def pool() -> DecoderPool:
    decoders = DecoderPool(2, 5.0)
    yield decoders
    decoders.close()


def test_the_same_pixels_and_refusals_as_in_process_from_concurrent_callers(pool: DecoderPool) -> None:
    files = {f"{i}.png": png(i, np.uint16 if i % 2 else np.uint8) for i in range(8)}
    with ThreadPoolExecutor(4) as threads:
        images = list(threads.map(lambda name: pool.load_image(files[name], name, 32, *LIMITS), files))
    for name, image in zip(files, images, strict=True):
        np.testing.assert_array_equal(image, load_image(files[name], name, 32))
    with pytest.raises(ImageDecodeError, match=r"^e\.png: empty file") as caught:
        pool.load_image(b"", "e.png", 32, *LIMITS)
    assert caught.value.kind == "empty"
    with pytest.raises(ImageDecodeError, match=r"over the limit of 100 \(data\.max_image_pixels\)") as caught:
        pool.load_image(files["0.png"], "0.png", 32, 100, DEFAULT_MAX_BYTES)
    assert caught.value.kind == "over_pixel_limit"


def test_a_file_that_decodes_for_minutes_is_stopped_at_the_deadline_and_the_next_one_decodes() -> None:
    pool = DecoderPool(1, 1.0)
    try:
        pool.load_image(png(0), "warm.png", 32, *LIMITS)  # the child is started: its start is not the file's time
        with pytest.raises(ImageDecodeError) as caught:
            pool.load_image(many_scans_jpeg(), "scans.jpeg", 32, *LIMITS)
        assert str(caught.value) == "scans.jpeg: decoding took longer than 1 s (data.max_decode_seconds); stopped"
        assert caught.value.kind == "decode_timeout"
        np.testing.assert_array_equal(pool.load_image(png(1), "next.png", 32, *LIMITS), load_image(png(1), "next.png", 32))
    finally:
        pool.close()


def test_a_decoder_that_crashes_costs_one_file(pool: DecoderPool) -> None:
    pool.load_image(png(0), "warm.png", 32, *LIMITS)
    child = pool._idle.queue[-1].process  # the child that will take the next file
    slow = many_scans_jpeg()

    def crash() -> None:
        time.sleep(0.5)  # while it decodes the slow file
        os.kill(child.pid, signal.SIGSEGV)

    threading.Thread(target=crash).start()
    with pytest.raises(ImageDecodeError, match=r"^scans\.jpeg: the image decoder crashed on this file \(killed by signal 11\)") as caught:
        pool.load_image(slow, "scans.jpeg", 32, *LIMITS)
    assert caught.value.kind == "decoder_crash"
    assert pool.load_image(png(2), "after.png", 32, *LIMITS).shape == (32, 32, 1)
