"""The benchmarks' plots: a scatter (points per group, hollow ones for runs that ended early) and
lines with error bars; one figure style."""
from __future__ import annotations

from pathlib import Path


def scatter(path: Path, groups: dict[str, tuple[list, list, list, list]], *, xlabel: str, ylabel: str,
            title: str) -> None:
    """groups: label -> (xs, ys, hollow_xs, hollow_ys), values in % ."""
    fig, ax = _figure()
    for label, (xs, ys, hollow_xs, hollow_ys) in groups.items():
        points = ax.scatter(xs, ys, label=label, s=22)
        if hollow_xs:
            ax.scatter(hollow_xs, hollow_ys, s=22, facecolors="none", edgecolors=points.get_facecolor(), alpha=0.5)
    _finish(fig, ax, path, xlabel, ylabel, title, legend_size=6)


def lines(path: Path, series: dict[str, tuple[list, list, list]], *, hline: tuple[str, float] | None = None,
          xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    """series: label -> (xs, means, stds); ``hline``: (label, y) drawn dashed across."""
    fig, ax = _figure()
    for label, (xs, means, stds) in series.items():
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    if hline:
        ax.axhline(hline[1], color="k", ls="--", label=hline[0])
    if logx:
        ax.set_xscale("log")
    _finish(fig, ax, path, xlabel, ylabel, title)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.8), dpi=110)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 7) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
