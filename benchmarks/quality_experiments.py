"""Ablations of the custom CNN recipe on the real training images, scored on the patient-grouped validation split.

Decodes the images once per image size, then trains each named recipe in this process with the same
``prepare_data``/``train_custom`` the CLI uses, and prints one line per recipe and threshold policy:
accuracy, ROC-AUC, sensitivity, specificity with 95% stratified-bootstrap intervals, the wall time of
training and the machine load. The validation threshold is also *cross-fitted* (chosen on one half of
the validation patients, applied to the other half, and vice versa), because a threshold scored on the
images it was chosen on always meets its sensitivity floor; the cross-fitted figure says how well the
policy transfers to unseen patients. Every result is appended as one JSON line to ``--log``.

    nice -n 5 python benchmarks/quality_experiments.py --data ../shared/data/chest-xray-224 \\
        --size 128 --epochs 6 --recipes base bn09 nocw
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pneumonet.config import Config, ThresholdConfig, load_config
from pneumonet.evaluation.metrics import choose_threshold, compute_metrics
from pneumonet.training.loop import predict_probabilities
from pneumonet.training.variants import PreparedData, prepare_data, train_custom

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "real-custom.yaml"

# name -> (config overrides on top of configs/real-custom.yaml, BatchNorm momentum)
RECIPES: dict[str, tuple[list[str], float]] = {
    "base": ([], 0.99),
    "bn09": ([], 0.9),
    "nocw": (["train.class_weight=none"], 0.99),
    "ls": (["train.label_smoothing=0.1"], 0.99),
    "noaug": (["train.augment.rotation=0", "train.augment.shift=0", "train.augment.zoom=0",
               "train.augment.brightness=0", "train.augment.contrast=0"], 0.99),
    "strongaug": (["train.augment.rotation=0.05", "train.augment.shift=0.12", "train.augment.zoom=0.2",
                   "train.augment.brightness=0.2", "train.augment.contrast=0.3"], 0.99),
    "wide": (["model.custom_filters=[32,64,128,256,256]"], 0.99),
    "reg": (["model.dropout=0.5", "model.l2=5e-4"], 0.99),
    "lr3e3": (["train.learning_rate=3e-3"], 0.99),
}
POLICIES = {
    "youden": ThresholdConfig(policy="youden"),
    "sens95": ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.95),
    "sens97": ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.97),
}


def load_average() -> float:
    return os.getloadavg()[0]


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images translated by (dy, dx) pixels with black fill, as the training augmentation does."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def tta_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean probability over the image and four 4%-shifted copies."""
    s = max(1, round(0.04 * images.shape[1]))
    views = [(0, 0), (s, 0), (-s, 0), (0, s), (0, -s)]
    return np.mean([predict_probabilities(model, shifted(images, dy, dx), batch_size) for dy, dx in views], axis=0)


def cross_fitted(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, policy: ThresholdConfig) -> dict:
    """Sensitivity/specificity when the threshold is chosen on the other half of the validation patients."""
    rng = np.random.default_rng(0)
    unique = np.unique(patients)
    half = set(rng.permutation(unique)[: len(unique) // 2].tolist())
    fold = np.array([p in half for p in patients])
    preds = np.zeros(len(labels), dtype=int)
    for mask in (fold, ~fold):
        threshold = choose_threshold(labels[~mask], probs[~mask], policy)
        preds[mask] = probs[mask] >= threshold
    pos, neg = labels == 1, labels == 0
    return {
        "xfit_sensitivity": float(preds[pos].mean()),
        "xfit_specificity": float(1 - preds[neg].mean()),
        "xfit_accuracy": float((preds == labels).mean()),
    }


def score(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray) -> dict[str, dict]:
    """Metrics with 95% bootstrap intervals per threshold policy, plus the cross-fitted figures."""
    results = {}
    for name, policy in POLICIES.items():
        threshold = choose_threshold(labels, probs, policy)
        metrics = compute_metrics(labels, probs, threshold, n_bootstrap=1000, seed=0)
        keep = {k: metrics[k] for k in ("threshold", "accuracy", "roc_auc", "sensitivity", "specificity", "brier")}
        results[name] = {**keep, "ci95": metrics["ci95"], **cross_fitted(labels, probs, patients, policy)}
    return results


def _ci(value: float, ci: list[float] | None) -> str:
    return f"{value:.3f} [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else f"{value:.3f}"


def run_recipe(name: str, config: Config, data: PreparedData, momentum: float, tta: bool) -> dict:
    config = config.model_copy(update={"model": config.model.model_copy(update={"bn_momentum": momentum})})
    load_before = load_average()
    started = time.perf_counter()
    model, state = train_custom(config, data)
    train_seconds = time.perf_counter() - started
    labels, patients = data.val.labels, data.val.rows["patient_id"].to_numpy()
    probs = predict_probabilities(model, data.val.images, config.train.batch_size)
    record = {
        "recipe": name, "image_size": config.model.image_size, "epochs": config.train.epochs,
        "bn_momentum": momentum, "epochs_run": state.epoch, "best_epoch": state.best_epoch,
        "train_seconds": round(train_seconds, 1), "load_before": load_before, "load_after": load_average(),
        "history_val_auc": [round(v, 4) for v in state.history.get("val_roc_auc", [])],
        "images_per_second": [round(v, 1) for v in state.history.get("images_per_second", [])],
        "scores": score(labels, probs, patients),
    }
    if tta:
        tta = tta_probabilities(model, data.val.images, config.train.batch_size)
        record["tta_scores"] = score(labels, tta, patients)
    keras.backend.clear_session()
    return record


def print_record(record: dict) -> None:
    print(f"\n== {record['recipe']} @ {record['image_size']} px, {record['epochs_run']}/{record['epochs']} epochs "
          f"(best {record['best_epoch']}), train {record['train_seconds']:.0f} s, "
          f"load {record['load_before']:.2f}->{record['load_after']:.2f}, val AUC by epoch {record['history_val_auc']}")
    for kind in ("scores", "tta_scores"):
        for policy, m in record.get(kind, {}).items():
            ci = m["ci95"]
            print(f"  {kind[:-7] or 'plain':5s} {policy:6s} thr {m['threshold']:.3f}  "
                  f"acc {_ci(m['accuracy'], ci['accuracy'])}  auc {_ci(m['roc_auc'], ci['roc_auc'])}  "
                  f"sens {_ci(m['sensitivity'], ci['sensitivity'])}  "
                  f"spec {_ci(m['specificity'], ci['specificity'])}  | cross-fitted sens {m['xfit_sensitivity']:.3f} "
                  f"spec {m['xfit_specificity']:.3f} acc {m['xfit_accuracy']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root in the Kaggle layout")
    parser.add_argument("--size", type=int, default=128, help="image side (reduced scale for ablations)")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--recipes", nargs="+", default=["base"], choices=sorted(RECIPES))
    parser.add_argument("--tta", action="store_true", help="also score test-time augmentation")
    parser.add_argument("--log", default="runs/quality_log.jsonl", help="append one JSON line per recipe here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra overrides for every recipe")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    epochs = [f"train.epochs={args.epochs}"] if args.epochs else []
    common = [f"model.image_size={args.size}", *epochs, *args.overrides]
    started = time.perf_counter()
    data = prepare_data(load_config(CONFIG, common), args.data)
    print(f"decoded {len(data.train)} train / {len(data.val)} val images at {args.size} px "
          f"in {time.perf_counter() - started:.1f} s (load {load_average():.2f})", flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    for name in args.recipes:
        overrides, momentum = RECIPES[name]
        record = run_recipe(name, load_config(CONFIG, [*common, *overrides]), data, momentum, args.tta)
        record["overrides"] = [*common, *overrides]
        print_record(record)
        with open(args.log, "a") as log:
            log.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
