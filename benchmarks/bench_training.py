"""Training throughput on this machine: against bare Keras, Ray Train with 1 vs 2 workers, feature caching, the parts alone.

Prints (and with ``--write`` saves as Markdown):

0. ``pneumonet train``'s images/s (the job's code path, 1 worker, default resources) next to a bare
   ``keras.Model.fit`` of the same custom model on the same decoded images with the same augmentation
   and class weights in this process, and their ratio (median over the epochs after the first;
   ``--repeat`` alternates the pair to see the noise); ``--compare-only`` stops there;
1. the input pipeline alone: decoding (the shared decoder, threaded; and through Ray Data) and
   decoding + augmentation with tf.data, in images/s;
2. the forward pass alone of each variant's model (inference, float32), in images/s;
3. training images/s of ``custom`` and ``finetune`` with 1 and 2 Ray Train workers (the job's own code
   path: ``run_training``), median over the epochs after the first (which includes tracing);
4. ``transfer``: epoch time with and without feature caching (one process, the same loop), plus the
   one-off cost of computing the cached features.

Real images from ``--data`` (default ../shared/data/chest-xray-224, read-only) when present, else a
synthetic set. ImageNet weights cannot be downloaded here, so the backbone starts random; that does
not change the cost of a step. Sized to finish in a few minutes on 2 CPU cores:

    python benchmarks/bench_training.py --write benchmarks/RESULTS-training.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from pneumonet.config import load_config
from pneumonet.data.images import load_many
from pneumonet.data.pipeline import training_dataset
from pneumonet.training.loop import fit, predict_batches
from pneumonet.training.ingest import prepare_data
from pneumonet.training.stages import build_stage, stage_settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest-xray-224"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min)"


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def _timed(fn, repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def _subset(data: Path, per_class: int, target: Path) -> str:
    """A reproducible subset of ``data/train`` as symbolic links (the real images stay where they are)."""
    rng = np.random.default_rng(0)
    for folder in sorted((data / "train").iterdir()):
        files = sorted(folder.iterdir())
        (target / "train" / folder.name).mkdir(parents=True)
        for index in rng.choice(len(files), size=min(per_class, len(files)), replace=False):
            (target / "train" / folder.name / files[index].name).symlink_to(files[index])
    return str(target)


def _median_rate(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)  # the first epoch traces the step


def bench_bare_keras(data, config) -> float:
    """Images/s of ``keras.Model.fit`` on the custom model, images, augmentation and class weights of the job."""
    import keras

    from pneumonet.training.loop import balanced_class_weight

    model = build_stage("custom", config).model
    model.compile(optimizer=keras.optimizers.Adam(config.train.learning_rate), loss="binary_crossentropy")
    dataset = training_dataset(data.train.images, data.train.labels, config.train.batch_size, config.seed, config.train.augment)
    steps = len(data.train) // config.train.batch_size
    times: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: times.append(time.perf_counter()),
        on_epoch_end=lambda *_: times.append(time.perf_counter() - times.pop()),
    )
    weights = dict(enumerate(balanced_class_weight(data.train.labels)))
    model.fit(dataset, epochs=config.train.epochs, class_weight=weights, callbacks=[timer], verbose=0)
    return _median_rate([steps * config.train.batch_size / seconds for seconds in times])


def bench_against_keras(root: str, data, config, storage: str, repeat: int) -> list[tuple[str, float]]:
    """``pneumonet train`` (custom, 1 worker, cpus_per_worker auto) and bare Keras, alternating, and their ratio."""
    from pneumonet.training.driver import run_training

    rows = []
    for attempt in range(1, repeat + 1):
        summary = run_training(config, ["custom"], root, f"{storage}/against-keras-{attempt}")["custom"]
        ours = _median_rate([ranks[0]["images_per_second"] for ranks in summary["epochs"]])
        load = os.getloadavg()[0]
        bare = bench_bare_keras(data, config)
        rows += [(f"pneumonet train, custom, 1 worker (run {attempt}, load {load:.1f})", ours),
                 (f"bare keras.Model.fit (run {attempt}, load {os.getloadavg()[0]:.1f})", bare),
                 (f"ratio pneumonet / keras (run {attempt})", ours / bare)]  # fmt: skip
    return rows


def bench_pipeline(data, config) -> list[tuple[str, float]]:
    """Decode (threads, and Ray Data) and decode+augment, images/s."""
    uris = data.train.rows["uri"].tolist()
    size = config.model.image_size
    seconds = _timed(lambda: load_many(uris, size, workers=config.data.decode_workers))
    results = [(f"decode, {config.data.decode_workers} threads (load_many)", _rate(len(uris), seconds))]

    from pneumonet.training.ingest import decode_split

    decode_split(data.train.rows, config)  # warm-up: starts the Ray worker processes and their imports
    seconds = _timed(lambda: decode_split(data.train.rows, config))  # materialized: every image decoded
    results.append(("decode, Ray Data tasks, warm (decode_split)", _rate(len(uris), seconds)))

    dataset = training_dataset(data.train.images, data.train.labels, config.train.batch_size, 0, config.train.augment)
    for _ in dataset.take(1):  # build the augmentation graph
        pass
    seconds = _timed(lambda: [None for _ in dataset])
    results.append(("augment only (tf.data, decoded images in memory)", _rate(len(data.train), seconds)))
    results.append(("decode + augment (serial sum)", 1 / (1 / results[0][1] + 1 / results[-1][1])))
    return results


def bench_forward(data, config, transfer_uri: str) -> list[tuple[str, float]]:
    """Inference images/s of each variant's full model, and of the transfer head on cached features."""
    images = data.train.images
    results = []
    for variant in ("custom", "transfer", "finetune"):
        stage = build_stage(variant, config, transfer_uri if variant == "finetune" else None)
        predict_batches(stage.model, images[: config.train.batch_size], config.train.batch_size)  # trace
        seconds = _timed(lambda stage=stage: predict_batches(stage.model, images, config.train.batch_size))
        results.append((f"{variant} model", _rate(len(images), seconds)))
        if variant == "transfer":
            features = predict_batches(stage.features, images, config.train.batch_size)
            predict_batches(stage.trained, features[:8], config.train.batch_size)
            seconds = _timed(lambda s=stage, f=features: predict_batches(s.trained, f, config.train.batch_size))
            results.append(("transfer head on cached features", _rate(len(images), seconds)))
    return results


def bench_caching(data, config) -> list[tuple[str, float]]:
    """Transfer epoch seconds with and without cached features (one process), and the one-off caching cost."""
    results = []
    for cache in (True, False):
        cfg = config.model_copy(deep=True)
        cfg.train.cache_features = cache
        cfg.train.epochs = 3
        stage = build_stage("transfer", cfg)
        started = time.perf_counter()
        train = predict_batches(stage.features, data.train.images, cfg.train.batch_size) if cache else data.train.images
        val = predict_batches(stage.features, data.val.images, cfg.train.batch_size) if cache else data.val.images
        if cache:
            results.append(("one-off: backbone features of train + val", time.perf_counter() - started))
        settings = stage_settings(cfg, (1.0, 1.0), "transfer")
        state = fit(stage.trained, (train, data.train.labels), (val, data.val.labels), settings)
        epochs = state.history["epoch_seconds"][1:]
        results.append((f"epoch (median of epochs 2-3), cache_features={str(cache).lower()}", statistics.median(epochs)))
    return results


def bench_workers(root: str, config, storage: str) -> list[tuple[str, float]]:
    """Training images/s of custom and finetune with 1 and 2 Ray Train workers (the job's code path)."""
    from pneumonet.training.driver import run_training

    results = []
    for workers, variants in ((1, ["custom", "transfer", "finetune"]), (2, ["custom", "finetune"])):
        cfg = config.model_copy(deep=True)
        cfg.distributed.workers = workers  # cpus_per_worker auto: the machine's cores shared by the workers
        summaries = run_training(cfg, variants, root, storage)
        for variant in ("custom", "finetune"):
            rates = [ranks[0]["images_per_second"] for ranks in summaries[variant]["epochs"][1:]]
            results.append((f"{variant}, {workers} worker(s)", statistics.median(rates)))
    return results


def _table(title: str, unit: str, rows: list[tuple[str, float]]) -> list[str]:
    def cell(name: str, value: float) -> str:
        return f"{value:.2f}×" if name.startswith("ratio") else f"{value:.{2 if unit == 'seconds' else 1}f}"

    return [f"### {title}", "", f"| measurement | {unit} |", "| --- | ---: |", *[f"| {n} | {cell(n, v)} |" for n, v in rows], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset root (Kaggle layout)")
    parser.add_argument("--per-class", type=int, default=120, help="training images per class (a random subset)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--backbone", default="MobileNetV2", help="keras.applications backbone (random weights)")
    parser.add_argument("--write", help="also write the results as Markdown here")
    parser.add_argument("--repeat", type=int, default=2, help="runs of the pneumonet-vs-Keras pair, alternating")
    parser.add_argument("--compare-only", action="store_true", help="only the pneumonet-vs-Keras comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tf.get_logger().setLevel("ERROR")

    workdir = Path(tempfile.mkdtemp(prefix="pneumonet-bench-"))
    if Path(args.data, "train").is_dir():
        root = _subset(Path(args.data), args.per_class, workdir / "subset")
    else:
        from pneumonet.data.synthetic import synthesize_dataset

        root = str(synthesize_dataset(workdir / "synthetic", n=2 * args.per_class, size=args.size, seed=0))
    overrides = [
        f"model.image_size={args.size}", f"model.backbone={args.backbone}", "model.weights=none",
        "data.decode_workers=4", "train.batch_size=16",
        "train.epochs=4", "train.finetune_epochs=3", "train.patience=10", "tracking.mode=disabled",
    ]  # fmt: skip
    config = load_config(None, overrides)
    load_before = _load()
    started = time.perf_counter()

    import ray

    from pneumonet.training.driver import ensure_ray

    ensure_ray(config)  # the job's local cluster: every core of this machine
    data = prepare_data(config, root)
    print(f"data: {root}: {len(data.train)} train / {len(data.val)} val images at {args.size} px", flush=True)

    sections = []
    storage = str(workdir / "store")
    rows = bench_against_keras(root, data, config, storage, args.repeat)
    sections.append(("pneumonet train against bare Keras (custom, median of epochs 2-4)", "images/s", rows))
    print(*_table(*sections[-1]), sep="\n", flush=True)

    if not args.compare_only:
        sections += _the_rest(root, data, config, storage)
    ray.shutdown()
    _report(args, data, sections, load_before, started)


def _the_rest(root: str, data, config, storage: str) -> list[tuple[str, str, list[tuple[str, float]]]]:
    """Sections 1-4 of the module docstring."""
    sections = []
    rows = bench_pipeline(data, config)
    sections.append(("Input pipeline alone", "images/s", rows))
    print(*_table(*sections[-1]), sep="\n", flush=True)

    rows = bench_workers(root, config, storage)
    sections.append(("Training with Ray Train (median of epochs 2-3)", "images/s", rows))
    print(*_table(*sections[-1]), sep="\n", flush=True)

    from pneumonet.registry import resolve_artifact_uri

    transfer_uri = resolve_artifact_uri(f"{storage}/models/transfer")
    rows = bench_forward(data, config, transfer_uri)
    sections.append(("Forward pass alone (inference, float32)", "images/s", rows))
    print(*_table(*sections[-1]), sep="\n", flush=True)

    rows = bench_caching(data, config)
    sections.append(("transfer: feature caching (one process)", "seconds", rows))
    print(*_table(*sections[-1]), sep="\n", flush=True)
    return sections


def _report(args, data, sections, load_before: str, started: float) -> None:
    minutes = (time.perf_counter() - started) / 60
    header = [
        "## Training benchmark (`benchmarks/bench_training.py`)",
        "",
        (
            f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, **shared "
            f"with other jobs while measuring** (load average before {load_before}, after {_load()}): figures are "
            "noisy and low; compare them with each other, not with other machines."
        ),
        (
            f"Data: {args.data} ({args.per_class} images per class drawn from train/, patient-split into "
            f"{len(data.train)} train / {len(data.val)} val), {args.size} px, batch 16 per replica, backbone "
            f"{args.backbone} with random weights, float32. "
            f"Total {minutes:.1f} min."
        ),
        "",
    ]
    text = "\n".join(header + [line for section in sections for line in _table(*section)])
    if args.write:
        Path(args.write).write_text(text)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
