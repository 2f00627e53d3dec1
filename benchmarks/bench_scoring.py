"""Batch-scoring throughput and memory (prints figures; not a test).

    python benchmarks/bench_scoring.py [--variant custom transfer] [--n 768] [--batch-size 32]
    python benchmarks/bench_scoring.py --scale [--scale-n 10000 100000 1000000] [--scale-source tiny|real]
    python benchmarks/bench_scoring.py --drift --model M [--n 768] [--rounds 2]

Throughput, per variant, in this process on this machine, same batch size:

- forward: the artifact's forward pass alone on images already decoded in memory (the ceiling);
- naive: a notebook-style loop, Keras ``model.predict`` over files loaded one batch at a time
  with PIL;
- pipeline: ``score_archive`` (Ray Data: list → read + decode tasks → actor pool → Parquet parts)
  overall (Ray start excluded; actor start-up and model loading included), and in steady state:
  from the landing of the second output part to the last one, one part per input block.

Each is reported as images/second (wall clock) and CPU-milliseconds per image summed over this
process and every process it started (Ray's workers included): on a shared, busy machine the CPU
time is the steadier yardstick. Targets: pipeline steady ≥ 0.85 × forward, pipeline ≥ 2 × naive.
Images come from ``../shared/data/chest-xray-224/train`` (read in place, never copied), synthetic
when it is absent; ``--upscale 1536`` scores temporary full-resolution-like JPEG copies instead,
where decoding is a real share of the work. Models are untrained (``transfer``: ResNet152V2,
weights none): same speed.

Scale (``--scale``): for archives of each ``--scale-n`` files, built as hard links (so they cost
no disk and every URI is distinct) to a pool of ``--scale-pool`` images in a folder tree of 1,000
files a folder (a PACS export's shape): ``tiny`` generated 48-pixel JPEGs (cheap to decode, so the
bookkeeping shows) or ``real`` images from ``../shared/data/chest-xray-224``. Scored with an
untrained ``custom`` model at ``--scale-image-size`` pixels, it prints per size: peak resident memory
of the driver (this process) and of the driver plus every Ray process (shared object-store pages
count once per process that maps them, so this overstates), the listing time (the input Dataset
counted alone), the planning time of the job (listing + anti-join), images/s in steady state (from
the first part's landing to the last's), the first run's wall time, and the re-run of the finished
job (everything found done) as a share of it: as it runs (the listing's digest matches the last
verified run's, no anti-join), and once more with the summary removed (the full anti-join, what a
changed archive costs). Targets: the driver's peak grows by at most 100 MiB from 10^4 to 10^6
files; the re-run takes under 5 % of the first run.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from PIL import Image

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-xray-224" / "train"


def image_files(n: int, work: Path) -> list[Path]:
    """``n`` distinct file paths: the real images (links when more are needed), else synthetic ones."""
    if REAL.is_dir():
        real = sorted(p for p in REAL.rglob("*") if p.is_file())
    else:
        from pneumonet.data.synthetic import synthesize_dataset

        print(f"{REAL} not found: using synthetic images", flush=True)
        real = sorted(p for p in synthesize_dataset(work / "synthetic", n=min(n, 2000), size=224).rglob("*.jpeg"))
    if n <= len(real):
        return real[:n]
    links = work / "links"
    links.mkdir(exist_ok=True)
    files = []
    for i in range(n):
        link = links / f"{i:06d}{real[i % len(real)].suffix}"
        if not link.exists():
            link.symlink_to(real[i % len(real)])
        files.append(link)
    return files


def upscaled(files: list[Path], side: int, work: Path) -> list[Path]:
    """Grayscale JPEG copies (quality 90) of ``files`` at ``side`` pixels a side: archives hold X-rays
    at full resolution (1-3 thousand pixels a side), the shared data set at 224."""
    folder = work / f"upscaled-{side}"
    folder.mkdir(exist_ok=True)
    copies = []
    for i, source in enumerate(files):
        target = folder / f"{i:06d}.jpeg"
        if not target.exists():
            with Image.open(source) as img:
                img.convert("L").resize((side, side), Image.Resampling.BICUBIC).save(target, quality=90)
        copies.append(target)
    return copies


def make_artifact(variant: str, image_size: int, work: Path) -> str:
    from pneumonet.artifact import build_metadata, save_artifact
    from pneumonet.config import load_config
    from pneumonet.models import build_model

    config = load_config(None, [f"model.image_size={image_size}", "model.weights=none"])
    meta = build_metadata(variant=variant, config=config, threshold=0.5, val_metrics={}, manifest_digest=None)
    return save_artifact(build_model(variant, config.model, seed=0), meta, str(work / f"model-{variant}-{image_size}"))


def scale_archive(n: int, pool: list[Path], work: Path) -> Path:
    """``n`` hard links to the ``pool`` images, 1,000 to a folder; no list of them is kept."""
    root = work / f"archive-{n}"
    for i in range(n):
        folder = root / f"d{i // 1000:05d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        source = pool[i % len(pool)]
        os.link(source, folder / f"{i:08d}{source.suffix}")
    return root


def scale_pool(source: str, size: int, work: Path) -> list[Path]:
    """The images the archive links to (copied into ``work``, as links cannot cross file systems):
    ``size`` generated JPEGs, or as many real ones."""
    folder = work / "pool"
    folder.mkdir()
    if source == "real":
        if not REAL.is_dir():
            raise SystemExit(f"{REAL} not found: use --scale-source tiny")
        return [Path(shutil.copy(p, folder)) for p in sorted(REAL.rglob("*.jpeg"))[:size]]
    rng = np.random.default_rng(0)
    pool = [folder / f"{i:04d}.jpeg" for i in range(size)]
    for path in pool:
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path, quality=90)
    return pool


def manifest(files: list[Path], path: Path) -> str:
    import pandas as pd

    pd.DataFrame({"uri": [str(f) for f in files]}).to_csv(path, index=False)
    return str(path)


@dataclass
class Measure:
    """One way of scoring ``n`` images: wall-clock rate and CPU milliseconds per image (whole process tree)."""

    n: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_seconds / self.n

    def __str__(self) -> str:
        return f"{self.rate:8.1f} images/s  {self.cpu_ms:7.1f} CPU-ms/image"


def forward_only(model_uri: str, files: list[Path], batch_size: int) -> Measure:
    """The artifact's forward pass on images decoded beforehand (not timed)."""
    from pneumonet.artifact import load_artifact
    from pneumonet.data.images import load_many

    artifact = load_artifact(model_uri)
    images = load_many([str(f) for f in files], artifact.image_size).images
    artifact.predict_proba(images[:batch_size], batch_size)  # trace once
    with TreeMonitor() as monitor:
        start = time.perf_counter()
        artifact.predict_proba(images, batch_size)
        seconds = time.perf_counter() - start
    return Measure(len(images), seconds, monitor.cpu_seconds)


def naive(model_uri: str, files: list[Path], batch_size: int) -> Measure:
    """What a notebook does: PIL-load a batch of files, ``model.predict`` it, repeat."""
    from pneumonet.artifact import load_artifact

    artifact = load_artifact(model_uri)
    size = artifact.image_size

    def load(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float32)[..., None]

    artifact.model.predict(np.zeros((1, size, size, 1), np.float32), verbose=0)
    with TreeMonitor() as monitor:
        start = time.perf_counter()
        for i in range(0, len(files), batch_size):
            artifact.model.predict(np.stack([load(f) for f in files[i : i + batch_size]]), verbose=0)
        seconds = time.perf_counter() - start
    return Measure(len(files), seconds, monitor.cpu_seconds)


def pipeline(model_uri: str, files: list[Path], work: Path, name: str, overrides: list[str],
             rows_per_part: int) -> tuple[Measure, Measure | None, dict]:  # fmt: skip
    """``score_archive`` of ``files``: overall (Ray start excluded; actor start-up and model loading
    included), and in steady state: from the landing of the second part to the last one (the first
    parts carry the start-up and rows buffered meanwhile)."""
    from pneumonet.config import load_config
    from pneumonet.scoring.batch import score_archive

    config = load_config(None, ["tracking.mode=disabled", f"score.rows_per_file={rows_per_part}", *overrides])
    output = work / f"out-{name}"
    with TreeMonitor(watch=output) as monitor:
        run = score_archive(model_uri, manifest(files, work / f"{name}.csv"), str(output), config)["run"]
    stats = {**run, "driver_peak_mib": monitor.driver_peak / 2**20, "total_peak_mib": monitor.total_peak / 2**20}
    overall = Measure(len(files), run["seconds"], monitor.cpu_seconds)
    start = next((mark for mark in monitor.marks if mark[0] >= 2), None)
    end = monitor.marks[-1]
    if start is None or end[0] <= start[0]:
        return overall, None, stats
    steady = Measure(len(files) - start[0] * rows_per_part, end[1] - start[1], end[2] - start[2])
    return overall, steady, stats


_TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, resident bytes, CPU seconds so far), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            statm = (entry / "statm").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
        found[int(entry.name)] = (int(fields[1]), int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE"), cpu)
    return found


class TreeMonitor:
    """Samples this process and every process it started (Ray's included) until stopped.

    Keeps the peak resident memory (this process alone, and the whole tree) and the CPU seconds the
    tree used meanwhile: CPU time per image is a fairer yardstick than wall time on a shared, busy
    machine. With ``watch`` (a scoring output folder) it notes (parts, wall time, CPU seconds) each
    time a new Parquet part lands there.
    """

    def __init__(self, watch: Path | None = None, interval: float = 0.1) -> None:
        self.watch, self.interval = watch, interval
        self.driver_peak = self.total_peak = 0
        self.marks: list[tuple[int, float, float]] = []
        self._start_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> dict[int, tuple[int, int, float]]:
        processes = _processes()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in processes.items():
            children.setdefault(parent, []).append(pid)
        tree, stack = {}, [os.getpid()]
        while stack:
            pid = stack.pop()
            if pid in processes:
                tree[pid] = processes[pid]
                stack.extend(children.get(pid, []))
        return tree

    def _sample(self) -> None:
        tree = self._tree()
        self.driver_peak = max(self.driver_peak, tree.get(os.getpid(), (0, 0, 0))[1])
        self.total_peak = max(self.total_peak, sum(rss for _, rss, _ in tree.values()))
        for pid, (_, _, cpu) in tree.items():
            self._last_cpu[pid] = cpu  # processes that end keep their last sample
        if self.watch is not None:
            count = len(list(self.watch.glob("part-*.parquet")))
            if count > (self.marks[-1][0] if self.marks else 0):
                self.marks.append((count, time.perf_counter(), self.cpu_seconds))

    @property
    def cpu_seconds(self) -> float:
        return sum(cpu - self._start_cpu.get(pid, 0.0) for pid, cpu in self._last_cpu.items())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._start_cpu = {pid: cpu for pid, (_, _, cpu) in self._tree().items()}
        self._last_cpu = dict(self._start_cpu)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def throughput(args: argparse.Namespace, work: Path) -> dict:
    from pneumonet.scoring.batch import BATCHES_PER_BLOCK

    results = {}
    for variant in args.variant:
        n = args.n or (768 if variant == "custom" else 320)
        model = args.model or make_artifact(variant, args.image_size, work)
        files = image_files(n, work)
        source = REAL if REAL.is_dir() else "synthetic images"
        if args.upscale:
            files, source = upscaled(files, args.upscale, work), f"{source}, upscaled to {args.upscale} px"
        print(f"\n== {variant}: {n} images ({source}), batch {args.batch_size}", flush=True)
        forward = forward_only(model, files, args.batch_size)
        print(f"forward pass alone    : {forward}", flush=True)
        notebook = naive(model, files, args.batch_size)
        print(f"naive PIL + predict   : {notebook}", flush=True)
        # One part per input block (the unit Ray Data streams in), so part landings time the blocks.
        rows = args.batch_size * BATCHES_PER_BLOCK
        overall, steady, run = pipeline(model, files, work, variant, [f"score.batch_size={args.batch_size}"], rows)
        print(f"pipeline, overall     : {overall}  (first part after {run['seconds_to_first_part']:.1f} s)", flush=True)
        if steady is None:
            print("pipeline, steady state: too few parts to tell; use a larger --n")
            continue
        print(f"pipeline, steady state: {steady}  (from the 2nd to the last of {-(-n // rows)} parts)", flush=True)
        print(f"  steady vs forward: {steady.rate / forward.rate:.2f} by wall clock, "
              f"{forward.cpu_ms / steady.cpu_ms:.2f} by CPU time (target >= 0.85)")  # fmt: skip
        print(f"  vs naive: overall {overall.rate / notebook.rate:.2f}x, steady {steady.rate / notebook.rate:.2f}x "
              f"by wall clock; steady {notebook.cpu_ms / steady.cpu_ms:.2f}x by CPU time (target >= 2)", flush=True)  # fmt: skip
        results[variant] = {
            "n": n, "batch_size": args.batch_size, "source": str(source), "seconds_to_first_part": run["seconds_to_first_part"],
            **{f"{name}_{key}": getattr(m, key) for name, m in (("forward", forward), ("naive", notebook),
               ("overall", overall), ("steady", steady)) for key in ("rate", "cpu_ms")},
        }  # fmt: skip
    return results


def drift_cost(args: argparse.Namespace, work: Path) -> dict:
    """Drift bookkeeping's cost (``--drift``): ``score_archive`` of the same files with ``--model`` (which must
    carry a drift reference) and with a copy of it without one, alternated ``--rounds`` times; prints the
    steady-state figures of both (best round), the overhead and the processes' peak memory."""
    from pneumonet.artifact import DRIFT_KEY, derive_artifact, load_artifact
    from pneumonet.scoring.batch import BATCHES_PER_BLOCK

    artifact = load_artifact(args.model)
    if DRIFT_KEY not in artifact.meta:
        raise SystemExit(f"--drift: {args.model} has no drift reference (pneumonet drift-reference adds one)")
    plain = derive_artifact(artifact, {k: v for k, v in artifact.meta.items() if k != DRIFT_KEY}, str(work / "plain"))
    n, rows = args.n or 768, args.batch_size * BATCHES_PER_BLOCK
    files = image_files(n, work)
    print(f"\n== drift cost: {n} images, batch {args.batch_size}, {args.rounds} alternated rounds", flush=True)
    best: dict[str, tuple[Measure, dict]] = {}
    for round_ in range(args.rounds):
        for name, model in (("without drift", plain), ("with drift", args.model)):
            overall, steady, run = pipeline(model, files, work, f"{name.replace(' ', '-')}-{round_}",
                                            [f"score.batch_size={args.batch_size}"], rows)  # fmt: skip
            measure = steady or overall
            print(f"{name:14s} round {round_ + 1}: {measure}  (total peak {run['total_peak_mib']:.0f} MiB)", flush=True)
            if name not in best or measure.cpu_ms < best[name][0].cpu_ms:
                best[name] = (measure, run)
    (off, off_run), (on, on_run) = best["without drift"], best["with drift"]
    print(f"drift adds {on.cpu_ms / off.cpu_ms - 1:+.1%} CPU time per image, {off.rate / on.rate - 1:+.1%} wall time "
          f"(best rounds); peak memory of every process {off_run['total_peak_mib']:.0f} -> {on_run['total_peak_mib']:.0f} MiB")  # fmt: skip
    return {name: {"rate": m.rate, "cpu_ms": m.cpu_ms, "total_peak_mib": r["total_peak_mib"]} for name, (m, r) in best.items()}


def scale(args: argparse.Namespace, work: Path) -> dict:
    from pneumonet.config import load_config
    from pneumonet.scoring.batch import score_archive
    from pneumonet.scoring.inputs import input_dataset
    from pneumonet.scoring.summary import SUMMARY_FILE

    # The model is built in a child process, so that this process (the driver) holds no TensorFlow,
    # as in a real scoring job.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        model = pool.submit(make_artifact, "custom", args.scale_image_size, work).result()
    images = scale_pool(args.scale_source, args.scale_pool, work)
    config = load_config(None, ["tracking.mode=disabled", f"score.batch_size={args.batch_size}",
                                f"score.rows_per_file={args.scale_rows_per_file}"])  # fmt: skip
    logging.getLogger("pneumonet.scoring").setLevel(logging.INFO)  # the job's progress lines
    results = {}
    for n in args.scale_n:
        start = time.perf_counter()
        root = scale_archive(n, images, work)
        built = time.perf_counter() - start
        start = time.perf_counter()
        listed = input_dataset(str(root)).count()
        listing = time.perf_counter() - start
        assert listed == n, (listed, n)
        output = work / f"scores-{n}"
        with TreeMonitor() as first:
            start = time.perf_counter()
            run = score_archive(model, str(root), str(output), config)["run"]
            first_seconds = time.perf_counter() - start
        reruns = {}
        for kind in ("digest", "anti-join"):
            if kind == "anti-join":  # as after a change, or an output of older code: the full anti-join
                (output / SUMMARY_FILE).unlink()
            with TreeMonitor() as again:
                start = time.perf_counter()
                rerun = score_archive(model, str(root), str(output), config)["run"]
                reruns[kind] = (time.perf_counter() - start, again.driver_peak)
            assert rerun["already_scored"] == n and rerun["parts_written"] == 0 and rerun["planned_by"] == kind, rerun
        rerun_seconds = reruns["digest"][0]
        results[n] = {
            "archive_build_seconds": built, "listing_seconds": listing, "planning_seconds": run["planning_seconds"],
            "first_run_seconds": first_seconds, "pipeline_seconds": run["seconds"], "check_seconds": run["check_seconds"],
            "steady_images_per_second": run["steady_images_per_second"], "overall_images_per_second": n / first_seconds,
            "driver_peak_mib": first.driver_peak / 2**20, "total_peak_mib": first.total_peak / 2**20,
            "rerun_seconds": rerun_seconds, "rerun_share": rerun_seconds / first_seconds,
            "rerun_driver_peak_mib": reruns["digest"][1] / 2**20, "rerun_anti_join_seconds": reruns["anti-join"][0],
            "rerun_anti_join_share": reruns["anti-join"][0] / first_seconds, "load_average": os.getloadavg()[0],
        }  # fmt: skip
        r = results[n]
        print(f"{n:>9,} files: driver peak {r['driver_peak_mib']:5.0f} MiB, driver + Ray {r['total_peak_mib']:6.0f} MiB; "
              f"listing {listing:5.1f} s, planning {r['planning_seconds']:5.1f} s; steady {r['steady_images_per_second'] or 0:6.0f} "
              f"images/s; first run {first_seconds:6.0f} s; re-run {rerun_seconds:5.1f} s ({100 * r['rerun_share']:.1f} %), "
              f"with the anti-join {r['rerun_anti_join_seconds']:5.1f} s ({100 * r['rerun_anti_join_share']:.1f} %); "
              f"load {r['load_average']:.1f}", flush=True)  # fmt: skip
        shutil.rmtree(output)
        shutil.rmtree(root)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", default=["custom", "transfer"], choices=["custom", "transfer"])
    parser.add_argument("--n", type=int, help="images per variant, at least 4 batches (default: 768 custom, 320 transfer)")
    parser.add_argument("--model", help="score this artifact instead of an untrained one per variant")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--upscale", type=int, help="score JPEG copies of the images at this many pixels a side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scale", action="store_true", help="measure memory, listing and resume at archive scale")
    parser.add_argument("--scale-n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--scale-source", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--scale-pool", type=int, default=300, help="distinct images the archive links to")
    parser.add_argument("--scale-image-size", type=int, default=32)
    parser.add_argument("--scale-rows-per-file", type=int, default=2000, help="rows per part (several parts time the steady state)")
    parser.add_argument("--drift", action="store_true", help="score --model with and without its drift reference")
    parser.add_argument("--rounds", type=int, default=2, help="--drift: alternated rounds of the two")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import ray

    with tempfile.TemporaryDirectory(prefix="pneumonet-bench-") as tmp:
        work = Path(tmp)
        print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start (shared machine: figures are noisy)")
        from pneumonet.scoring.cluster import INLINE_RESULT_BYTES, INLINE_RESULT_ENV

        os.environ.setdefault(INLINE_RESULT_ENV, str(INLINE_RESULT_BYTES))  # as a scoring job's Ray has it
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            results = scale(args, work) if args.scale else drift_cost(args, work) if args.drift else throughput(args, work)
        finally:
            ray.shutdown()
        print(f"load average {os.getloadavg()[0]:.1f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
