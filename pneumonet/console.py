"""What a person sees in the terminal: Pneumonet's own lines there, every other library's output in a log file.

A command with a run folder (train, evaluate, calibrate, adapt, score, demo) calls :func:`log_to` before it imports
TensorFlow or starts Ray. From then on, unless ``-v``:

- the terminal shows the ``pneumonet`` loggers (a line per stage and per epoch, progress, warnings
  the user must act on), the command's results on stdout and its tqdm bars;
- everything else goes to ``<folder>/pneumonet.log`` (scoring: ``_pneumonet.log``), named on the first line: other libraries'
  Python logging, whatever this process writes to file descriptor 2 below Python (TensorFlow's
  C++ log: oneDNN, absl, cuInit), and the output of the local Ray's workers (Ray Data plans,
  Ray Train's banners, TensorFlow in the training workers), which Ray relays to this process.

``-v`` leaves all of it on the terminal, as the libraries print it. Either way the root logger
gets the ``pneumonet`` lines too, so the log file reads as one story.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

LOG_FILE = "pneumonet.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("absl", "tensorflow", "h5py", "matplotlib", "PIL", "urllib3", "botocore", "filelock")

log = logging.getLogger("pneumonet")

class _State:
    verbose = False
    console: logging.Handler | None = None  # the terminal's handler, made by configure()
    terminal: TextIO | None = None  # the terminal's stream once descriptor 2 points at the file
    saved_fd: int | None = None  # descriptor 2 as it was, to put back
    file: Path | None = None
    stream: TextIO | None = None  # the log file, for Python-level writers
    into_file: logging.Handler | None = None


class _Ours(logging.Filter):
    """Only Pneumonet's own records reach the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "pneumonet" or record.name.startswith("pneumonet.")


def duration(seconds: float) -> str:
    """``1h05m``, ``4m07s``: how long something takes, as an ETA line shows it."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def configure(verbose: bool) -> None:
    """Logging of a command: every record to stderr (``-v``: debug level too), noisy libraries at WARNING."""
    restore()
    _State.verbose = verbose
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _State.console = handler


def verbose() -> bool:
    return _State.verbose


def terminal() -> TextIO:
    """The terminal's error stream (the user's, even while :func:`log_to` points descriptor 2 at the file)."""
    return _State.terminal or sys.stderr


def log_file() -> Path | None:
    """The log file :func:`log_to` opened, if any."""
    return _State.file


def log_to(folder: str | os.PathLike | None, name: str = LOG_FILE) -> Path | None:
    """Send other libraries' output to ``folder/name`` (see the module docstring); returns its path.

    ``folder`` may be an ``s3://`` URI or None: the log then goes to ``$TMPDIR/pneumonet/<pid>-<name>``.
    With ``-v``, before :func:`configure` or when already done, nothing changes and None is returned.
    """
    if _State.verbose or _State.file is not None or not isinstance(_State.console, logging.StreamHandler):
        return None
    if folder is not None and "://" not in str(folder):
        path = Path(folder).absolute() / name
    else:
        path = Path(tempfile.gettempdir()) / "pneumonet" / f"{os.getpid()}-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    _State.saved_fd = os.dup(2)
    # The terminal: a stream of its own on the old descriptor 2, unless stderr is not that descriptor
    # (a test's capture), which then stays the terminal.
    real = _fileno(sys.stderr) == 2
    _State.terminal = os.fdopen(os.dup(_State.saved_fd), "w", buffering=1) if real else sys.stderr
    _State.stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed by restore()
    os.dup2(_State.stream.fileno(), 2)  # sys.stderr and every C library of this process now write to the file
    _State.console.setStream(_State.terminal)
    _State.console.addFilter(_Ours())
    _State.into_file = logging.StreamHandler(_State.stream)
    _State.into_file.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(_State.into_file)
    logging.captureWarnings(True)
    _State.file = path
    log.info("log: %s (other libraries' messages; -v shows them here instead)", path)
    return path


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):
        return None


def restore() -> None:
    """Undo :func:`log_to`: descriptor 2 back to the terminal, the log file closed (end of a command)."""
    if _State.file is None:
        return
    sys.stderr.flush()
    if _State.saved_fd is not None:
        os.dup2(_State.saved_fd, 2)
        os.close(_State.saved_fd)
    logging.getLogger().removeHandler(_State.into_file)
    logging.captureWarnings(False)
    if _State.console is not None:
        _State.console.filters.clear()
        if isinstance(_State.console, logging.StreamHandler):
            _State.console.setStream(sys.stderr)
    if _State.terminal is not None and _State.terminal is not sys.stderr:
        _State.terminal.close()
    _State.stream.close()
    _State.terminal = _State.saved_fd = _State.file = _State.stream = _State.into_file = None


def route_ray_output() -> None:
    """After ``ray.init`` (with ``log_to_driver``): the workers' output Ray relays goes to the log file.

    Ray prints it to this process's stdout/stderr through a dispatcher of its own (``ray._private``,
    Ray is pinned to 2.60 in pyproject.toml); the handler is swapped for one that writes to the file.
    Without :func:`log_to` (or with ``-v``) Ray's printing stays.
    """
    stream = _State.stream
    if stream is None:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def to_file(data: dict) -> None:
        if stream.closed:  # the command ended before Ray did
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        stream.writelines(f"({who} pid={data.get('pid')}) {line}\n" for line in data.get("lines", ()))

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_file)
