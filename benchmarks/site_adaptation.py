"""What ``pneumonet adapt`` buys on the site sample, next to ``pneumonet calibrate``, for one trained model.

Both are judged the same way, on figures no threshold or weight was fitted to:

* ROC-AUC with a patient-grouped 95 % interval: the source model's own scores, and the adapted
  models' out-of-fold scores (each image scored by a fold model that never saw its patient);
* site-calibrated sensitivity/specificity/accuracy: a threshold chosen on a random half of the site's
  patients (sensitivity ≥ 0.95), judged on the other half, averaged over 50 splits — for the source
  model that is what ``calibrate`` buys, for the out-of-fold scores what ``adapt`` buys.

Prints one line per model and appends a JSON record to ``--log``. Minutes on 2 CPU cores
(``adapt.folds`` + 1 fine-tunings on the 208 images):

    python benchmarks/site_adaptation.py --model runs/real-custom/custom \\
        --site ../shared/data/site-sample --out runs/real-custom/custom-adapted --log adapt.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from pneumonet.artifact import load_artifact
from pneumonet.config import ThresholdConfig, load_config
from pneumonet.evaluation.calibrate import held_out_estimate, rates_at
from pneumonet.evaluation.metrics import bootstrap_ci
from pneumonet.evaluation.run import decode_split
from pneumonet.training.adapt import adapt_artifact


POLICY = ThresholdConfig(policy="min_sensitivity", min_sensitivity=0.95)  # calibrate's and adapt's default


def figures(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, training_threshold: float) -> dict:
    return {
        "roc_auc": float(roc_auc_score(labels, probs)),
        "roc_auc_ci": bootstrap_ci(labels, probs, training_threshold, 1000, 0, groups=patients)["roc_auc"],
        "at_training_threshold": rates_at(labels, probs, training_threshold),
        "site_calibrated": held_out_estimate(labels, probs, patients, POLICY),
    }


def describe(name: str, found: dict) -> str:
    low, high = found["roc_auc_ci"]
    at, cal = found["at_training_threshold"], found["site_calibrated"]
    return (f"{name:<28} ROC-AUC {found['roc_auc']:.3f} [{low:.3f}–{high:.3f}]  training threshold acc/sens/spec "
            f"{at['accuracy']:.3f}/{at['sensitivity']:.3f}/{at['specificity']:.3f}  site-calibrated "
            f"{cal['accuracy']:.3f}/{cal['sensitivity']:.3f}/{cal['specificity']:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained custom artifact")
    parser.add_argument("--site", required=True, help="the site's labelled sample (test/NORMAL, test/PNEUMONIA)")
    parser.add_argument("--out", required=True, help="where the adapted artifact goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, help="append one JSON line here")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="adapt.* settings, e.g. adapt.epochs=8")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # fold and epoch lines

    source = load_artifact(args.model)
    images = decode_split(source, args.site, "test")
    labels, patients = images.labels, images.rows["patient_id"].astype(str).to_numpy()
    training_threshold = float(source.meta["threshold"])
    before = figures(labels, source.predict_proba(images.images), patients, training_threshold)
    print(describe("source model", before), flush=True)

    started = time.perf_counter()
    record = adapt_artifact(args.model, args.site, args.out, POLICY, load_config(None, args.overrides).adapt, seed=args.seed)
    seconds = time.perf_counter() - started
    predictions = Path(args.out) / "evaluation" / "site" / "predictions.csv"
    oof = pd.read_csv(predictions).dropna(subset=["probability"]).set_index("uri").loc[images.rows["uri"], "probability"]
    after = figures(labels, oof.to_numpy(), patients, training_threshold)
    print(describe("adapted (out of fold)", after), flush=True)
    print(f"adapt took {seconds / 60:.1f} min; per fold ROC-AUC before → after: "
          + ", ".join(f"{f['roc_auc_before']:.3f}→{f['roc_auc_after']:.3f}" for f in record["folds"]))  # fmt: skip
    if args.log:
        entry = {"model": args.model, "version": source.version, "seed": args.seed, "settings": record["settings"],
                 "source": before, "adapted_out_of_fold": after, "folds": record["folds"], "seconds": seconds,
                 "site_threshold": record["calibration"]["threshold"]}  # fmt: skip
        with args.log.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()
