"""``pneumonet demo``: the whole system in a few minutes on a laptop, with nothing to download.

Synthesizes a small dataset, trains the three variants briefly, evaluates them on the test split
and writes ``report.md`` with the comparison and the plots each variant produced. The output folder
is the run storage too: the models are ``models/<variant>/<run-id>/`` with a ``latest`` pointer, so
``--model OUT/models/<variant>`` names the newest one (as for any ``pneumonet train --storage``).
"""

from __future__ import annotations

import logging
import time
from importlib.resources import files
from pathlib import Path

from pneumonet.config import VARIANTS, load_config
from pneumonet.data.synthetic import synthesize_dataset
from pneumonet.evaluation.metrics import format_metric
from pneumonet.evaluation.plots import plot_comparison

log = logging.getLogger(__name__)

DEMO_CONFIG = files("pneumonet") / "configs" / "demo.yaml"
DEMO_IMAGES = 320  # synthetic train/ images: 265 to train on and 67 to validate after the patient split; 80 test images


def write_report(summaries: dict[str, dict], out: Path, seconds: float, config_note: str) -> Path:
    """A Markdown report comparing the variants on the test split, linking every plot."""
    results = {name: summary["test"] for name, summary in summaries.items()}
    plot_comparison(results, out / "comparison.png")
    n_test = next(iter(results.values()))["n"]
    lines = [
        "# Pneumonet demo report",
        "",
        f"Synthetic chest-X-ray-like data, three variants trained briefly ({seconds / 60:.1f} min in all). "
        f"Figures are on the held-out test split ({n_test} images), at the threshold each model chose on its "
        "validation patients; the 95% intervals resample whole patients.",
        "",
        "**What these figures mean.** The images are drawn by `pneumonet.data.synthetic`: cartoons of a chest "
        "radiograph whose pneumonia cases carry painted opacities (a tenth of them faint, and some normal lungs "
        "carry faint haze). A high ROC-AUC here shows that the pipeline works end to end (decoding, the "
        "patient-grouped split, training, the threshold chosen on validation, evaluation on unseen patients) and "
        "that a model can learn such a signal from a few hundred images; it says nothing about real chest X-rays. "
        "Real-data figures, and how they were measured, are in docs/quality.md.",
        "",
        config_note,
        "",
        "| variant | accuracy (95% CI) | ROC-AUC (95% CI) | sensitivity | specificity | threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in results.items():
        ci = m.get("ci95", {})
        acc_ci = "[{}, {}]".format(*map(format_metric, ci.get("accuracy") or [None, None]))
        auc_ci = "[{}, {}]".format(*map(format_metric, ci.get("roc_auc") or [None, None]))
        lines.append(
            f"| {name} | {format_metric(m['accuracy'])} {acc_ci} | {format_metric(m['roc_auc'])} {auc_ci} | "
            f"{format_metric(m['sensitivity'])} | {format_metric(m['specificity'])} | {format_metric(m['threshold'])} |"
        )
    lines += ["", "![comparison](comparison.png)", ""]
    for name, summary in summaries.items():
        folder = Path(summary["artifact"]).relative_to(out)
        lines += [
            f"## {name}",
            "",
            f"Artifact: `{folder}`, the latest of `{folder.parent}` (score with "
            f"`pneumonet predict --model {out / folder.parent} IMAGE`).",
            "",
            f"![training curves]({folder}/training_curves.png) ![ROC]({folder}/evaluation/test/roc_curve.png) "
            f"![confusion matrix]({folder}/evaluation/test/confusion_matrix.png)",
            "",
        ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def run_demo(out: str | Path = "pneumonet-demo", overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Run the demo into ``out`` and return the report's path."""
    started = time.perf_counter()
    out = Path(out).absolute()
    config = load_config(Path(str(DEMO_CONFIG)), overrides)
    log.info("synthesizing a dataset in %s", out / "data")
    data_root = synthesize_dataset(out / "data", n=DEMO_IMAGES, size=config.model.image_size, seed=config.seed)
    from pneumonet.training.driver import run_training  # the job of `pneumonet train` and jobs/train.py

    # The run stays in ``out`` unless the config names a run storage (as for `pneumonet train`).
    summaries = run_training(config, list(VARIANTS), str(data_root), config.distributed.storage or str(out))
    note = (
        f"Backbone `{config.model.backbone}` with weights `{config.model.weights}`"
        + (" (random: no ImageNet weights offline, so transfer/finetune are far below what they reach with "
           "real weights; pass `model.backbone=ResNet152V2 model.weights=PATH` to use a local weights file)." if config.model.weights == "none" else ".")
    )  # fmt: skip
    report = write_report(summaries, out, time.perf_counter() - started, note)
    log.info("demo finished in %.0f s", time.perf_counter() - started)
    return report
