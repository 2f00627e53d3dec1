"""The end-of-job summary of a scoring output: counts, failures, throughput and score distribution.

It is computed from the output's parts (all runs, so a resumed job reports the whole output) and
written next to them as ``_summary.json``, ``_histogram.png`` and (with a drift reference)
``_drift.png``; the leading underscore keeps them out of ``pandas.read_parquet(output)`` and pyarrow
dataset discovery. ``drift`` holds the verdict of the window tests of :mod:`pneumonet.evaluation.drift`
on the output's uniform drift sample (``drift.sample`` images at most, so that an alarm means the same
for a thousand files and for ten million: a test on every row of a huge archive would flag any
difference, however small), and ``out_of_distribution`` counts the gate's flags over every row.

The workers reduce each batch of rows to a partial (counts, failures by ``error_kind``, a
histogram of :data:`FINE_BINS` bins, a few error messages) and the driver adds the partials up as
they stream in, so the summary of ten million rows holds no row on the driver. Quantiles come
from the fine histogram: within one bin width (1/:data:`FINE_BINS` = 5e-5) of the exact ones.

A run whose final check proved the output complete also records there, under ``resume``, what the
next run needs to see that nothing changed (:mod:`pneumonet.scoring.plan`); such a run then takes
the counts of :data:`OUTPUT_KEYS` from this summary instead of reading every part again: they are a
function of the parts, and the parts are the same.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from pneumonet import storage
from pneumonet.config import DriftConfig
from pneumonet.evaluation.drift import NO_REFERENCE, Reference, drift_png, window_tests
from pneumonet.scoring.parts import fingerprint, parts_dataset, read_drift_sample

SUMMARY_FILE = "_summary.json"
HISTOGRAM_FILE = "_histogram.png"
DRIFT_PLOT_FILE = "_drift.png"
BINS = 20
FINE_BINS = BINS * 1000
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
EXAMPLES = 20
COLUMNS = ["probability", "prediction", "error", "error_kind", "in_distribution"]
# The kind counted for an error row without one (a part written before rows had error_kind).
UNCLASSIFIED = "unclassified"
# The summary's sections computed from the rows of the parts by summarize_output.
OUTPUT_KEYS = ("files", "scored", "failures", "failures_by_kind", "predictions", "probability", "failure_examples",
               "out_of_distribution")  # fmt: skip
RESUME_KEY = "resume"


def partial_stats(batch: pa.Table) -> pa.Table:
    """Ray Data map: a batch of rows → one row holding its partial summary (JSON)."""
    probs = batch.column("probability").drop_null().to_numpy().astype(np.float64)
    bins = np.clip((probs * FINE_BINS).astype(np.int64), 0, FINE_BINS - 1)
    failed = pc.is_valid(batch.column("error"))
    errors = batch.column("error").filter(failed)
    kinds = pc.fill_null(batch.column("error_kind").filter(failed), UNCLASSIFIED)
    predictions = pc.value_counts(batch.column("prediction").drop_null()).to_pylist()
    checked = batch.column("in_distribution").drop_null()
    partial = {
        "files": batch.num_rows,
        "failures": len(errors),
        "checked": len(checked),
        "flagged": len(checked) - pc.sum(checked).as_py() if len(checked) else 0,
        "sum": float(probs.sum()),
        "histogram": np.bincount(bins, minlength=FINE_BINS).tolist(),
        "predictions": {item["values"]: item["counts"] for item in predictions},
        "failures_by_kind": {item["values"]: item["counts"] for item in pc.value_counts(kinds).to_pylist()},
        "failure_examples": errors.slice(0, EXAMPLES).to_pylist(),
    }
    return pa.table({"partial": [json.dumps(partial)]})


def _quantile(cumulative: np.ndarray, q: float) -> float:
    """``numpy.quantile``'s linear estimate, with each value placed inside its fine bin."""
    n = int(cumulative[-1])

    def value(rank: int) -> float:
        index = int(np.searchsorted(cumulative, rank, side="right"))
        before = cumulative[index - 1] if index else 0
        inside = cumulative[index] - before
        return (index + (rank - before + 0.5) / inside) / FINE_BINS

    h = (n - 1) * q
    low, high = int(np.floor(h)), int(np.ceil(h))
    return value(low) + (h - low) * (value(high) - value(low))


def summarize_output(output: str) -> dict[str, Any]:
    """Counts and the probability distribution over every row of ``output``'s parts (all runs)."""
    totals = {"files": 0, "failures": 0, "sum": 0.0, "checked": 0, "flagged": 0}
    histogram = np.zeros(FINE_BINS, np.int64)
    predictions: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    examples: list[str] = []
    dataset = parts_dataset(output, COLUMNS)
    partials = dataset.map_batches(partial_stats, batch_format="pyarrow") if dataset is not None else None
    for table in partials.iter_batches(batch_size=None, batch_format="pyarrow") if partials is not None else ():
        for text in table.column("partial").to_pylist():
            partial = json.loads(text)
            for key in totals:
                totals[key] += partial[key]
            histogram += np.asarray(partial["histogram"], np.int64)
            for counts, more in ((predictions, partial["predictions"]), (by_kind, partial["failures_by_kind"])):
                for name, count in more.items():
                    counts[name] = counts.get(name, 0) + count
            examples += partial["failure_examples"][: EXAMPLES - len(examples)]
    scored = int(histogram.sum())
    cumulative = np.cumsum(histogram)
    return {
        "files": totals["files"],
        "scored": scored,
        "failures": totals["failures"],
        "failures_by_kind": dict(sorted(by_kind.items())),
        "predictions": dict(sorted(predictions.items())),
        "probability": {
            "mean": totals["sum"] / scored if scored else None,
            "quantiles": {f"p{round(q * 100):02d}": _quantile(cumulative, q) if scored else None for q in QUANTILES},
            "histogram": {"edges": [round(float(e), 4) for e in np.linspace(0.0, 1.0, BINS + 1)],
                          "counts": histogram.reshape(BINS, -1).sum(axis=1).tolist()},
        },
        "failure_examples": examples,
        "out_of_distribution": {"checked": totals["checked"], "flagged": totals["flagged"]},
    }  # fmt: skip


def verified_summary(output: str, model: str) -> dict[str, Any] | None:
    """The output's summary if it still describes the output: written after a check that proved it
    complete (it has ``resume``), for ``model``, and the parts are still the ones checked (the same
    :func:`~pneumonet.scoring.parts.fingerprint`). None otherwise, or when there is none."""
    uri = storage.join(output, SUMMARY_FILE)
    if not storage.exists(uri):
        return None
    try:
        summary = json.loads(storage.read_text(uri))
    except ValueError:  # not ours, or cut short by hand: the anti-join decides
        return None
    resume = summary.get(RESUME_KEY) if isinstance(summary, dict) else None
    if not isinstance(resume, dict) or summary.get("model") != model or resume.get("parts") != fingerprint(output):
        return None
    return summary


def drift_summary(output: str, reference: Reference | None, config: DriftConfig, title: str) -> tuple[dict[str, Any], bytes | None]:
    """The ``drift`` section of the summary and its plot (None without a reference)."""
    if reference is None:
        return {"verdict": "not checked", "reason": NO_REFERENCE}, None
    sample = read_drift_sample(output, config.sample)
    if sample is None:
        scores, projections, inside = np.zeros(0), np.zeros((0, reference.components.shape[0])), np.zeros(0, bool)
    else:
        scores = sample.column("raw_probability").to_numpy()
        projections = np.asarray(sample.column("projection").to_pylist(), np.float32)
        inside = sample.column("in_distribution").to_numpy(zero_copy_only=False).astype(bool)
    verdict = window_tests(reference, scores, projections, inside, config)
    verdict["sample"] = "a uniform sample of the output's scored images (drift.sample at most), raw scores"
    return verdict, drift_png(reference, scores, verdict, title)


def histogram_png(summary: dict[str, Any], threshold: float, title: str) -> bytes:
    """A bar chart of the probability histogram with the decision threshold marked."""
    hist = summary["probability"]["histogram"]
    edges = np.asarray(hist["edges"])
    # A bare Figure (not pyplot): no global figure registry, no backend switch (as in evaluation.plots).
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("P(PNEUMONIA)")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_summary(output: str, summary: dict[str, Any], threshold: float, title: str, drift_plot: bytes | None = None) -> None:
    summary = {**summary, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    storage.write_text(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    storage.write_bytes(storage.join(output, HISTOGRAM_FILE), histogram_png(summary, threshold, title))
    if drift_plot is not None:
        storage.write_bytes(storage.join(output, DRIFT_PLOT_FILE), drift_plot)
