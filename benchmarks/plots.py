"""The benchmarks' one scatter plot: points per group, hollow ones for runs that ended early."""
from __future__ import annotations

from pathlib import Path


def scatter(path: Path, groups: dict[str, tuple[list, list, list, list]], *, xlabel: str, ylabel: str,
            title: str) -> None:
    """groups: label -> (xs, ys, hollow_xs, hollow_ys), values in % ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    for label, (xs, ys, hollow_xs, hollow_ys) in groups.items():
        points = ax.scatter(xs, ys, label=label, s=22)
        if hollow_xs:
            ax.scatter(hollow_xs, hollow_ys, s=22, facecolors="none", edgecolors=points.get_facecolor(), alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
