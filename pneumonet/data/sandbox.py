"""Decoding under a deadline: the shared decoder run in child processes that are killed when late.

Batch scoring and the endpoint decode files nobody has vetted, and the byte and pixel limits of
:mod:`pneumonet.data.images` bound a file's memory, not its time: libjpeg re-walks the whole image
for every scan of a progressive JPEG, so a 1.6 MB file of 2000x2000 pixels and 10,000 empty scans
took 8.6 s to decode here, and the cost grows with pixels times scans (pydicom's pure-Python RLE
decoder and zlib streams are further candidates). A thread stuck in such C code cannot be stopped
from Python, and a signal is handled only between bytecodes of the main thread, so the one bound
that holds is a process that can be killed: :class:`DecoderPool` sends each file to a child
process running :func:`~pneumonet.data.images.load_image` and kills the child when its answer is
later than ``data.max_decode_seconds``; the next file gets a fresh child. A crash in a C decoder
costs one file the same way, not the Ray worker or the replica.

The parent and a child talk over the child's stdin and stdout in frames: two little-endian uint32
lengths, a JSON header and a raw payload (the file's bytes in, the pixels out). Nothing a child
sends is unpickled or executed by the parent, since the child is the process handling hostile bytes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

import numpy as np

from pneumonet.errors import ImageDecodeError, PneumonetError

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # header length, payload length
# How long a new child may take to import the decoder (NumPy, Pillow, pydicom) before it is
# declared broken: generous, a loaded node takes seconds. Not part of any file's time.
START_TIMEOUT_S = 120.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _write_frame(stream: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    stream.write(_FRAME.pack(len(encoded), len(payload)) + encoded)
    stream.write(payload)
    stream.flush()


def _read_exactly(fd: int, size: int, deadline: float) -> bytes:
    """``size`` bytes from ``fd``; TimeoutError past ``deadline``, EOFError if the writer is gone."""
    chunks, left = [], size
    while left:
        remaining = None if deadline == float("inf") else deadline - time.monotonic()
        if remaining is not None and (remaining <= 0 or not select.select([fd], [], [], remaining)[0]):
            raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float) -> tuple[dict[str, Any], bytes]:
    header_size, payload_size = _FRAME.unpack(_read_exactly(fd, _FRAME.size, deadline))
    header = json.loads(_read_exactly(fd, header_size, deadline))
    return header, _read_exactly(fd, payload_size, deadline)


class _Child:
    """One decoder process, used by one caller at a time."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pneumonet.data.sandbox"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.fd = self.process.stdin, self.process.stdout.fileno()
        try:
            _read_frame(self.fd, time.monotonic() + START_TIMEOUT_S)  # "ready": the decoder is imported
        except (TimeoutError, EOFError, OSError, ValueError):
            self.kill()
            raise RuntimeError(f"the decoder process did not start within {START_TIMEOUT_S} s "
                               f"(exit code {self.process.returncode})") from None  # fmt: skip

    def decode(self, data: bytes, job: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], bytes]:
        _write_frame(self.stdin, job, data)
        return _read_frame(self.fd, time.monotonic() + timeout_s)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


def _exit_reason(code: int | None) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


class DecoderPool:
    """:func:`~pneumonet.data.images.load_image` in up to ``processes`` child processes, each call
    bounded by ``timeout_s``; thread-safe. Children start on first use (or :meth:`warm`) and are
    reused; one that is late or dies is replaced at once."""

    def __init__(self, processes: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._processes = processes
        self._slots = threading.BoundedSemaphore(processes)
        self._idle: queue.LifoQueue[_Child] = queue.LifoQueue()

    def load_image(self, data: bytes, source: str, size: int, max_pixels: int, max_bytes: int) -> np.ndarray:
        """As :func:`~pneumonet.data.images.load_image`; a decode slower than ``timeout_s`` raises
        :class:`ImageDecodeError` of kind ``decode_timeout``, a child that dies one of kind ``decoder_crash``."""
        job = {"source": source, "size": size, "max_pixels": max_pixels, "max_bytes": max_bytes}
        with self._slots:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                child = _Child()
            try:
                header, payload = child.decode(data, job, self.timeout_s)
            except TimeoutError:
                self._replace(child)
                raise ImageDecodeError(f"{source}: decoding took longer than {self.timeout_s:g} s "
                                       "(data.max_decode_seconds); stopped", kind="decode_timeout") from None  # fmt: skip
            except (EOFError, OSError, ValueError):  # the child died: a broken pipe, a short or garbled frame
                reason = _exit_reason(self._replace(child))
                log.warning("the decoder process died on %s (%s)", source, reason)
                raise ImageDecodeError(f"{source}: the image decoder crashed on this file ({reason})", kind="decoder_crash") from None
            self._idle.put(child)
        if not header["ok"]:
            raise ImageDecodeError(header["message"], kind=header["kind"])
        return np.frombuffer(payload, np.uint8).reshape(header["shape"]).copy()

    def _replace(self, child: _Child) -> int | None:
        """Kill a late or dead child and start its successor now, at the cost of the file that broke
        it rather than of the next caller; returns the old child's exit code."""
        child.kill()
        try:
            self._idle.put(_Child())
        except RuntimeError:
            log.warning("could not start a new decoder process; the next file will try again")
        return child.process.returncode

    def warm(self) -> None:
        """Start every child now (a replica does, before it reports ready), so no request waits for one."""
        for _ in range(self._processes - self._idle.qsize()):
            self._idle.put(_Child())

    def close(self) -> None:
        """Stop the idle children (busy ones are stopped by their caller's deadline)."""
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


def _serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child's loop: decode each file it is sent, until its stdin closes."""
    from pneumonet.data.images import load_image

    _write_frame(stdout, {"ready": True})
    fd = stdin.fileno()
    while True:
        try:
            job, data = _read_frame(fd, float("inf"))
        except EOFError:
            return
        try:
            image = load_image(data, job["source"], job["size"], job["max_pixels"], job["max_bytes"])
        except PneumonetError as exc:
            _write_frame(stdout, {"ok": False, "kind": exc.kind, "message": str(exc)})
            continue
        except Exception as exc:  # a decoder bug: this file's row, and the traceback in the worker's log
            traceback.print_exc()
            message = f"{job['source']}: unexpected {type(exc).__name__} while decoding: {exc}"
            _write_frame(stdout, {"ok": False, "kind": "decoder_crash", "message": message})
            continue
        _write_frame(stdout, {"ok": True, "shape": list(image.shape)}, image.tobytes())


if __name__ == "__main__":
    # Frames go to a copy of stdout; whatever a library prints (to sys.stdout or file descriptor 1)
    # goes to stderr instead of into a frame.
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _serve(sys.stdin.buffer, frames)
