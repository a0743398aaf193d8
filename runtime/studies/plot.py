"""Curves of a job as a PNG: training loss and every `eval_*` metric against the step.

    from colaflow.plot import write_png
    write_png(job.metrics(), "colaflow-out/knowledge/curves.png", title="knowledge")

Needs matplotlib (`pip install "colaflow[plot]"`); drawn with the Agg backend, so no display is needed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('writing curves needs matplotlib: pip install "colaflow[plot]"') from None
    matplotlib.use("Agg", force=True)  # files only: never a window, never a display
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the maps that carry it as a finite number."""
    points = [(m["step"], float(m[key])) for m in metrics
              if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)
              and math.isfinite(float(m[key])) and "step" in m]
    return [s for s, _ in points], [v for _, v in points]


def write_png(metrics: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw `loss` and every `eval_*` key of per-step metrics maps against `step`; returns the path.

    Losses share the left panel (eval_loss beside the training loss); every other eval metric
    (exact match, a user metric) gets a panel of its own.
    """
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        raise ValueError("`metrics` must be a list of per-step maps (e.g. job.metrics())")
    if not any("loss" in m for m in metrics):
        raise ValueError("`metrics` has no `loss`: nothing to draw (has the job run a step?)")
    plt = _pyplot()
    others = sorted({k for m in metrics for k in m if k.startswith("eval_") and k != "eval_loss"})
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(5 * (1 + len(others)), 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(*_series(metrics, "loss"), label="loss", linewidth=1)
    steps, values = _series(metrics, "eval_loss")
    if steps:
        ax.plot(steps, values, "o-", label="eval_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    for ax, key in zip(axes[0][1:], others):
        steps, values = _series(metrics, key)
        ax.plot(steps, values, "o-", color="tab:green")
        if values and all(0.0 <= v <= 1.0 for v in values):
            ax.set_ylim(-0.05, 1.05)  # a fraction (exact match, accuracy): show it on its whole scale
        ax.set_xlabel("step")
        ax.set_title(key)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
