"""Plots people would rather look at than tables: forecast against truth for a few sensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_forecasts(result: dict, path: str | Path, nodes: list[int] | None = None, channel: int = 0,
                   horizons: tuple[int, ...] = (1, 12), max_windows: int = 168, title: str = "") -> Path:
    """Truth and the h-step-ahead forecasts over consecutive windows, one panel per node.

    result: the dict of stllm.infer.predict (prediction [b, t_out, N, C], truth, timestamps [b, t_out]).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred, truth, times = result["prediction"], result["truth"], result["timestamps"]
    nodes = list(range(min(4, pred.shape[2]))) if nodes is None else nodes
    b = min(max_windows, pred.shape[0])
    fig, axes = plt.subplots(len(nodes), 1, figsize=(11, 2.4 * len(nodes)), sharex=True, squeeze=False)
    for ax, node in zip(axes[:, 0], nodes):
        ax.plot(times[:b, 0], truth[:b, 0, node, channel], color="black", lw=1.2, label="truth")
        for h in horizons:
            h = min(h, pred.shape[1])
            ax.plot(times[:b, h - 1], pred[:b, h - 1, node, channel], lw=1, alpha=0.85, label=f"forecast, {h} step(s) ahead")
        ax.set_ylabel(str(result["node_ids"][node]))
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=len(horizons) + 1)
    axes[0, 0].set_title(title or f"{result['channels'][channel]}: forecast against truth")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Dates on the x axis laid out, the folder made, the PNG written, the figure closed."""
    import matplotlib.pyplot as plt
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
