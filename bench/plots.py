"""Plots for docs/benchmarks.md (needs the `bench` extra: matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(ax) -> None:
    """Ticks at 1, 2 and 5 of each decade of the log axes, in plain numbers, so that a range
    narrower than a decade still gets labels."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    for axis in (a for a in (ax.xaxis, ax.yaxis) if a.get_scale() == "log"):
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(NullFormatter())


def predicted_vs_measured(path: Path, series: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Scatter of predicted against measured milliseconds, one colour per series, log axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = np.inf, 0.0
    for label, (measured, predicted) in series.items():
        ax.scatter(measured * 1e3, predicted * 1e3, s=14, label=label)
        lo = min(lo, measured.min() * 1e3, predicted.min() * 1e3)
        hi = max(hi, measured.max() * 1e3, predicted.max() * 1e3)
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--")
    ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)", title=title)
    _plain_log_ticks(ax)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_vs_tokens(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Step time against tokens per step, one line per curve, log axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, (tokens, seconds) in curves.items():
        ax.plot(tokens, seconds * 1e3, label=label, linewidth=1.5)
    ax.set(xscale="log", yscale="log", xlabel="tokens in the step", ylabel="time (ms)", title=title)
    _plain_log_ticks(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attainment_curves(path: Path, curves: dict[str, dict[str, list[tuple[float, float]]]], title: str,
                      xlabel: str = "requests per second per GPU") -> None:
    """SLO attainment against arrival rate: one panel per scenario, one line per policy."""
    plt = _pyplot()
    names = list(curves)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for policy, points in curves[name].items():
            rates, shares = zip(*points)
            ax.plot(rates, shares, marker="o", markersize=3, linewidth=1.2, label=policy)
        ax.axhline(0.9, color="grey", linewidth=0.8, linestyle="--")
        ax.set(xscale="log", ylim=(0, 1.02), xlabel=xlabel, ylabel="SLO attainment",
               title=name)
        _plain_log_ticks(ax)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdfs(path: Path, samples: dict[str, tuple[list[float], list[float]]], title: str) -> None:
    """CDFs of time to first token and of time per output token (ms), one line per class."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, pair in samples.items():
        for ax, xs in zip(axes, pair):
            if xs:
                ax.plot(np.sort(xs), np.arange(1, len(xs) + 1) / len(xs), linewidth=1.3, label=name)
    for ax, what in zip(axes, ("time to first token (ms)", "time per output token (ms)")):
        ax.set(xscale="log", ylim=(0, 1.02), xlabel=what, ylabel="share of requests")
        _plain_log_ticks(ax)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling(path: Path, series: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Capacity against replicas, one line per policy, with linear scaling from one replica."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for policy, points in series.items():
        counts, caps = zip(*points)
        line, = ax.plot(counts, caps, marker="o", linewidth=1.5, label=policy)
        ax.plot(counts, [caps[0] * n / counts[0] for n in counts], color=line.get_color(), linewidth=0.8,
                linestyle="--")
    ax.set(xscale="log", yscale="log", xlabel="replicas", ylabel="capacity (req/s)", title=title)
    ax.set_xticks([n for n, _ in next(iter(series.values()))], [str(n) for n, _ in next(iter(series.values()))])
    _plain_log_ticks(ax)
    ax.legend(fontsize=8, title="dashed: linear", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arrival_histograms(path: Path, arrivals: dict[str, list[float]], title: str, bin_s: float = 5.0) -> None:
    """Arrivals per second over each window, one panel per scenario: the bursts' cycles show."""
    plt = _pyplot()
    names = list(arrivals)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names) + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        times = np.asarray(arrivals[name])
        bins = np.arange(0.0, times.max() + bin_s, bin_s)
        counts, edges = np.histogram(times, bins)
        ax.step(edges[:-1], counts / bin_s, where="post", linewidth=1.0)
        ax.set(ylabel="arrivals/s", title=name)
    axes.flat[-1].set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
