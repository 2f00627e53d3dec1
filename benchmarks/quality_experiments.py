"""Which recipe transfers: train custom-CNN recipes on the real training images, judge them on the site sample.

Validation patients come from the training distribution and flatter a model; the site sample
(``--site``, a labelled third of the release's test patients) is how a model transfers. For every
recipe this decodes the images once, trains in this process with the CLI's own ``train_stage``, and
after every epoch scores both the validation split and the site sample, so model selection rules
(best validation ROC-AUC, last epoch) can be compared afterwards. It prints, and appends to
``--log`` as one JSON line per recipe and seed:

* validation ROC-AUC and the validation threshold (the recipe's policy) — in-distribution figures;
* site ROC-AUC with a 95% *patient-grouped* bootstrap interval, and site accuracy/sensitivity/
  specificity at the validation threshold (what a hospital gets without calibrating);
* site-calibrated figures: a threshold chosen on a random half of the site patients (sensitivity
  ≥ 0.95), scored on the other half, averaged over 50 splits (what ``pneumonet calibrate`` buys).

Per-epoch probabilities go to ``<out>/<recipe>-s<seed>/probs.npz`` (and the model to ``model.keras``) so ensembles of runs can be
scored without retraining (``--ensemble``).

    nice -n 5 python benchmarks/quality_experiments.py --data ../shared/data/chest-xray-224 \\
        --site ../shared/data/site-sample --recipes base frame --seeds 42
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
from sklearn.metrics import roc_auc_score

from pneumonet.config import Config, ThresholdConfig, load_config
from pneumonet.data.catalog import scan
from pneumonet.data.pipeline import load_image_set
from pneumonet.evaluation.calibrate import held_out_estimate, rates_at
from pneumonet.evaluation.metrics import bootstrap_ci, choose_threshold
from pneumonet.training.loop import predict_probabilities
from pneumonet.training.ingest import prepare_data
from pneumonet.training.stages import train_stage

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "real-custom.yaml"
FRAME = ["train.augment.zoom_in=0.25", "train.augment.stretch=0.15", "train.augment.shift=0.1"]
PHOTO = ["train.augment.gamma=0.3", "train.augment.brightness=0.2", "train.augment.contrast=0.3",
         "train.augment.blur=1.0"]
# name -> config overrides on top of configs/real-custom.yaml (and --common)
RECIPES: dict[str, list[str]] = {
    "base": [],
    "frame": FRAME,
    "photo": PHOTO,
    "frame_photo": FRAME + PHOTO,
    "frame_photo_ls": FRAME + PHOTO + ["train.label_smoothing=0.1"],
    "frame_photo_std": FRAME + PHOTO + ["model.input_norm=per_image"],
    "frame_photo_crop": FRAME + PHOTO + ["model.center_crop=0.85"],
    "frame_photo_std_crop": FRAME + PHOTO + ["model.input_norm=per_image", "model.center_crop=0.85"],
    "frame_photo_std_ls": FRAME + PHOTO + ["model.input_norm=per_image", "train.label_smoothing=0.05"],
    "strongframe_photo": ["train.augment.zoom_in=0.4", "train.augment.stretch=0.25", "train.augment.shift=0.12",
                          "train.augment.rotation=0.05", *PHOTO],
    "frame_photo_wide": FRAME + PHOTO + ["model.custom_filters=[32,64,128,256,256]"],
    "frame_photo_reg": FRAME + PHOTO + ["model.dropout=0.5", "model.l2=5e-4"],
    # on top of the recipe as it stands (frame, photo and per-image standardisation are in it)
    "ls": ["train.label_smoothing=0.1"],
    "long": ["train.epochs=30"],
    "wide": ["model.custom_filters=[48,96,192,384]", "model.custom_dense_units=192"],
    "px224": ["model.image_size=224"],
}
SITE_POLICY = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.95)  # what `pneumonet calibrate` does by default


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(roc_auc_score(labels, probs))


def judge(val: tuple[np.ndarray, np.ndarray], site: tuple[np.ndarray, np.ndarray, np.ndarray], config: Config) -> dict:
    """Validation and site figures of one set of predictions (see the module docstring)."""
    val_labels, val_probs = val
    labels, probs, patients = site
    threshold = choose_threshold(val_labels, val_probs, config.train.threshold)
    return {
        "val_auc": auc(val_labels, val_probs),
        "val_threshold": threshold,
        "site_auc": auc(labels, probs),
        "site_auc_ci": bootstrap_ci(labels, probs, threshold, 1000, 0, groups=patients)["roc_auc"],
        "site_at_val_threshold": rates_at(labels, probs, threshold),
        "site_calibrated": held_out_estimate(labels, probs, patients, SITE_POLICY),
    }


def describe(name: str, verdict: dict) -> str:
    at, cal, ci = verdict["site_at_val_threshold"], verdict["site_calibrated"], verdict["site_auc_ci"]
    return (
        f"  {name:10s} val AUC {verdict['val_auc']:.3f} thr {verdict['val_threshold']:.3f} | site AUC "
        f"{verdict['site_auc']:.3f} [{ci[0]:.3f}-{ci[1]:.3f}]  at val thr: acc {at['accuracy']:.3f} sens "
        f"{at['sensitivity']:.3f} spec {at['specificity']:.3f} | calibrated: acc {cal['accuracy']:.3f} sens "
        f"{cal['sensitivity']:.3f} spec {cal['specificity']:.3f}"
    )


def run_recipe(name: str, config: Config, data, site, out: Path) -> dict:
    """Train one recipe and seed; score validation and site after every epoch."""
    per_epoch: dict[str, list[np.ndarray]] = {"val": [], "site": []}
    batch = config.train.batch_size

    def on_epoch_end(fitter, state, figures) -> None:
        per_epoch["val"].append(predict_probabilities(fitter.model, data.val.images, batch))
        per_epoch["site"].append(predict_probabilities(fitter.model, site.images, batch))
        print(f"    epoch {figures['epoch']}: val AUC {figures['val_roc_auc']:.4f}  site AUC "
              f"{auc(site.labels, per_epoch['site'][-1]):.4f}  {figures['images_per_second']:.0f} img/s", flush=True)

    started = time.perf_counter()
    stage, state = train_stage("custom", config, (data.train.images, data.train.labels), (data.val.images, data.val.labels),
                               on_epoch_end=on_epoch_end)  # fmt: skip
    model = stage.model
    seconds = time.perf_counter() - started
    folder = out / f"{name}-s{config.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")  # best-validation weights, for Grad-CAM of the site's errors
    keras.backend.clear_session()
    np.savez(folder / "probs.npz", val=np.array(per_epoch["val"]), site=np.array(per_epoch["site"]),
             val_labels=data.val.labels, site_labels=site.labels)  # fmt: skip
    site_truth = (site.labels, site.rows["patient_id"].to_numpy())
    best = state.best_epoch - 1
    record = {
        "recipe": name, "seed": config.seed, "image_size": config.model.image_size,
        "epochs_run": state.epoch, "best_epoch": state.best_epoch, "train_seconds": round(seconds, 1),
        "load_average": os.getloadavg()[0],
        "site_auc_by_epoch": [round(auc(site.labels, p), 4) for p in per_epoch["site"]],
        "val_auc_by_epoch": [round(v, 4) for v in state.history.get("val_roc_auc", [])],
        "best_val_epoch": judge((data.val.labels, per_epoch["val"][best]), (site_truth[0], per_epoch["site"][best], site_truth[1]), config),
        "last_epoch": judge((data.val.labels, per_epoch["val"][-1]), (site_truth[0], per_epoch["site"][-1], site_truth[1]), config),
    }  # fmt: skip
    return record


def ensemble(folders: list[str], config: Config, site) -> dict:
    """Mean last-epoch probability of several runs, judged like one run."""
    loaded = [np.load(Path(f) / "probs.npz") for f in folders]
    val = np.mean([item["val"][-1] for item in loaded], axis=0)
    probs = np.mean([item["site"][-1] for item in loaded], axis=0)
    return judge((loaded[0]["val_labels"], val), (site.labels, probs, site.rows["patient_id"].to_numpy()), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training root in the Kaggle layout")
    parser.add_argument("--site", required=True, help="the site's labelled sample (a test/ folder or flat classes)")
    parser.add_argument("--recipes", nargs="+", default=["base"], choices=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--ensemble", nargs="+", metavar="RUN_FOLDER", help="score the mean of these runs instead")
    parser.add_argument("--out", default="runs/quality", help="per-run probabilities go here")
    parser.add_argument("--log", default="runs/quality/log.jsonl", help="append one JSON line per run here")
    parser.add_argument("common", nargs="*", metavar="KEY=VALUE", help="overrides for every recipe")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    config = load_config(CONFIG, args.common)
    site_rows = scan(args.site)
    site = load_image_set(site_rows[site_rows["error"].isna()], config.model.image_size, config.data)
    if args.ensemble:
        print(describe("ensemble", ensemble(args.ensemble, config, site)))
        return
    started = time.perf_counter()
    data = prepare_data(config, args.data)
    print(f"decoded {len(data.train)} train / {len(data.val)} val / {len(site)} site images at "
          f"{config.model.image_size} px in {time.perf_counter() - started:.0f} s", flush=True)
    out = Path(args.out)
    for name in args.recipes:
        for seed in args.seeds:
            overrides = [*args.common, *RECIPES[name], f"seed={seed}"]
            print(f"\n== {name} seed {seed}: {' '.join(overrides)}", flush=True)
            record = run_recipe(name, load_config(CONFIG, overrides), data, site, out)
            record["overrides"] = overrides
            print(f"  {record['epochs_run']} epochs (best val {record['best_epoch']}) in {record['train_seconds']:.0f} s")
            print(describe("best-val", record["best_val_epoch"]))
            print(describe("last", record["last_epoch"]), flush=True)
            with open(args.log, "a") as log:
                log.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
