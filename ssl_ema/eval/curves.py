"""Training curves from a run's ``metrics.jsonl``: loss, learning rate, momentum, and the kNN
accuracy of the teacher, the student and every EMA copy, against samples seen.

Samples seen, not steps, is the x axis: it is what every schedule is a function of, so runs at
different batch sizes (or with progressive scaling) line up (Busbridge et al. 2023, Sec. 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Series = dict[str, tuple[list[float], list[float]]]  # line name -> (samples seen, values)

TRAIN_PANELS = {"loss": ("loss",), "learning rate": ("lr",),
                "teacher momentum": ("momentum_base", "momentum")}


def training_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """Panels ``{"loss", "learning rate", "teacher momentum", "kNN top-1"}`` of one run."""
    panels: dict[str, Series] = {name: {} for name in (*TRAIN_PANELS, "kNN top-1")}
    for r in records:
        if r.get("event") == "train":
            for panel, keys in TRAIN_PANELS.items():
                for key in keys:
                    if key in r:
                        xs, ys = panels[panel].setdefault(key, ([], []))
                        xs.append(float(r["samples_seen"]))
                        ys.append(float(r[key]))
        elif r.get("event") == "eval":
            for key, value in r.items():
                if key.startswith("knn_"):  # knn_teacher, knn_student, knn_ema_<momentum>
                    xs, ys = panels["kNN top-1"].setdefault(key[4:], ([], []))
                    xs.append(float(r["samples_seen"]))
                    ys.append(float(value))
    return panels


def plot_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """One PNG with a panel per quantity; lines named ``<run> <series>`` when several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: training_curves(records) for name, records in runs.items()}
    panels = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, panel in zip(axes, panels):
        for run, run_panels in curves.items():
            for series, (xs, ys) in run_panels[panel].items():
                label = series if len(runs) == 1 else f"{run} {series}"
                ax.plot(xs, ys, marker="o" if panel == "kNN top-1" else None, markersize=3,
                        label=label)
        ax.set(title=panel, xlabel="samples seen")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
