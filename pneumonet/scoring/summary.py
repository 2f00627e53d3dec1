"""The end-of-job summary of a scoring output: counts, failures, throughput and score distribution.

It is computed from the output's parts (all runs, so a resumed job reports the whole output) and
written next to them as ``_summary.json`` and ``_histogram.png``; the leading underscore keeps
both out of ``pandas.read_parquet(output)`` and pyarrow dataset discovery.
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
from pneumonet.scoring.parts import SCHEMA, read_parts

SUMMARY_FILE = "_summary.json"
HISTOGRAM_FILE = "_histogram.png"
BINS = 20
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def summarize_output(output: str, inputs: pa.Array) -> dict[str, Any]:
    """Counts and the probability distribution over every row in ``output``'s parts, and how many
    of ``inputs`` have no row (``missing``) or several (``duplicate_rows``); both must be 0.

    Arrow compute throughout, so a summary of millions of rows needs no Python object per row.
    """
    columns = ["uri", "probability", "prediction", "error"]
    table = pa.concat_tables([SCHEMA.empty_table().select(columns), *read_parts(output, columns)])
    uris = pc.unique(table.column("uri"))
    found = pc.sum(pc.is_in(inputs, value_set=uris)).as_py() or 0
    errors = table.column("error")
    probs = table.column("probability").drop_null().to_numpy().astype(np.float64)
    predictions = pc.value_counts(table.column("prediction").drop_null()).to_pylist()
    counts, edges = np.histogram(probs, bins=BINS, range=(0.0, 1.0))
    return {
        "files": table.num_rows,
        "missing": len(inputs) - found,
        "duplicate_rows": table.num_rows - len(uris),
        "scored": int(probs.size),
        "failures": table.num_rows - errors.null_count,
        "predictions": {item["values"]: item["counts"] for item in sorted(predictions, key=lambda i: i["values"])},
        "probability": {
            "mean": float(probs.mean()) if probs.size else None,
            "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(probs, q)) if probs.size else None for q in QUANTILES},
            "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
        },
        "failure_examples": errors.drop_null().slice(0, 20).to_pylist(),
    }


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


def write_summary(output: str, summary: dict[str, Any], threshold: float, title: str) -> None:
    summary = {**summary, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    storage.write_text(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    storage.write_bytes(storage.join(output, HISTOGRAM_FILE), histogram_png(summary, threshold, title))
