"""Pictures of a dataset: class balance per split and a grid of sample images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pneumonet.data.catalog import usable  # noqa: E402
from pneumonet.data.images import load_many  # noqa: E402


def plot_class_distribution(summary: dict[str, dict[str, int]], path: str | Path) -> Path:
    """Stacked bars per split: normal, bacterial and viral pneumonia (and unknown subtype)."""
    splits = list(summary)
    parts = [("NORMAL", "normal", "#4c9be8"), ("BACTERIA", "bacteria", "#e8774c"), ("VIRUS", "virus", "#c44ce8"),
             ("UNKNOWN_SUBTYPE", "pneumonia, subtype unknown", "#999999")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    bottom = np.zeros(len(splits))
    for key, name, colour in parts:
        counts = np.array([summary[s].get(key, 0) for s in splits], dtype=float)
        if counts.any():
            ax.bar(splits, counts, bottom=bottom, label=name, color=colour)
            bottom += counts
    for i, split in enumerate(splits):
        ax.text(i, bottom[i], f"{int(bottom[i])} images\n{summary[split]['patients']} patients", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("Class distribution per split")
    ax.set_ylim(0, bottom.max() * 1.2 if bottom.max() else 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_sample_grid(manifest: pd.DataFrame, path: str | Path, per_class: int = 6, seed: int = 0, size: int = 160) -> Path:
    """A row of random images per subtype, titled with patient id, to eyeball labels and quality."""
    rows = usable(manifest)
    groups = [(name, part.sample(n=min(per_class, len(part)), random_state=seed)) for name, part in rows.groupby("subtype")]
    fig, axes = plt.subplots(len(groups), per_class, figsize=(1.8 * per_class, 2.0 * len(groups)), dpi=110, squeeze=False)
    for r, (name, part) in enumerate(groups):
        loaded = load_many(part["uri"].tolist(), size)
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(loaded.ok):
                ax.imshow(loaded.images[c, :, :, 0], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{name}\n{part.iloc[loaded.ok[c]]['patient_id']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
