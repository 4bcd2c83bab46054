"""PNG figures: tag heatmaps over time (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install 'sslam[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(result, labels: Sequence[tuple[str, str]], path: str | Path, top_k: int = 10) -> None:
    """Heatmap of the file's top classes (rows) over its windows (columns)."""
    plt = pyplot()
    top = np.argsort(-result.scores, kind="stable")[:top_k]
    grid = np.stack([s[top] for _, _, s in result.segments], axis=1)
    starts = [a for a, _, _ in result.segments]
    end = result.segments[-1][1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(starts) + 3), 0.35 * len(top) + 1.5))
    extent = (0.0, max(end, starts[-1] + 1e-3), len(top) - 0.5, -0.5)
    im = ax.imshow(
        grid, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest"
    )
    ax.set_yticks(range(len(top)), [labels[i][1] for i in top])
    ax.set_xlabel("time (s)")
    ax.set_title(str(result.path))
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
