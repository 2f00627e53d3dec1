"""How often the window tests alarm on validation patients they were not built from (docs/drift.md).

    python benchmarks/drift_null_calibration.py --model runs/drift2/s42-custom --data ../shared/data/chest-xray-224 \
        [--trials 80] [--seed 11]

Each trial is independent: a reference built on a fresh random half of the model's validation patients,
one patient-grouped window of about 200 images from the other half. Nothing differs but the patients,
so each test should give p <= 0.01 in about 1 % of trials and the Holm rule alarm in at most 1 %.
Prints the share of trials with p <= 0.01 / 0.05 / 0.2 per test and the alarm rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from drift_evidence import SUBSET_IMAGES, patient_subsets  # noqa: E402

from pneumonet.artifact import load_artifact  # noqa: E402
from pneumonet.config import Config  # noqa: E402
from pneumonet.evaluation.drift import build_reference, window_tests  # noqa: E402
from pneumonet.evaluation.run import decode_split  # noqa: E402

TESTS = ("scores_ks", "embeddings_mmd", "ood_share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the training data root (its validation patients)")
    parser.add_argument("--trials", type=int, default=80)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    artifact = load_artifact(args.model)
    config = Config.model_validate(artifact.meta["config"])
    val = decode_split(artifact, args.data, "val")
    raw, emb = artifact.predict_with_embeddings(val.images)
    patients, images = val.rows["patient_id"].to_numpy(), val.images
    rng = np.random.default_rng(args.seed)
    p_values, alarms = [], []
    for trial in range(args.trials):
        unique = rng.permutation(np.unique(patients))
        half = np.isin(patients, unique[: len(unique) // 2])
        ref, _ = build_reference(raw[half], emb[half], patients[half], config.drift, config.seed, images[half])
        other = np.flatnonzero(~half)
        window = other[patient_subsets(patients[other], rng, 1, SUBSET_IMAGES)[0]]
        inside, _ = ref.gate(emb[window], images[window])
        result = window_tests(ref, raw[window], ref.project(emb[window]), inside, config.drift, seed=trial)
        p_values.append([result["tests"][name]["p_value"] for name in TESTS])
        alarms.append(result["verdict"] == "drift")
        print(trial, result["verdict"], np.round(p_values[-1], 4), flush=True)
    p = np.array(p_values)
    summary = {name: {f"p<={level}": float(np.mean(p[:, i] <= level)) for level in (0.01, 0.05, 0.2)} for i, name in enumerate(TESTS)}
    print(json.dumps({"trials": args.trials, "alarm_rate": float(np.mean(alarms)), "tests": summary,
                      "load_average": os.getloadavg()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
