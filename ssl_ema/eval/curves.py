"""Training curves from a run's ``metrics.jsonl``: loss, learning rate, momentum, and the accuracy
of the teacher, the student and every EMA copy (kNN for the self-supervised methods, test top-1
for the classification methods), against samples seen.

Samples seen, not steps, is the x axis: it is what every schedule is a function of, so runs at
different batch sizes (or with progressive scaling) line up (Busbridge et al. 2023, Sec. 3).

In the figure a run keeps one colour in every panel; a line's style says what it is (`style`):
teacher solid, student dashed, each EMA copy dotted with its own marker, a base value dashed
beside its applied value; the fair floor (``knn_random_bn``: the random student with BatchNorm
statistics recomputed, measured once before training) is a dash-dotted horizontal line, not a
point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = dict[str, tuple[list[float], list[float]]]  # line name -> (samples seen, values)

TRAIN_PANELS = {"loss": ("loss",), "learning rate": ("lr",),
                "teacher momentum": ("momentum_base", "momentum")}
ACCURACY_PANELS = ("kNN top-1", "test top-1")
FLOOR = "random_bn"  # knn_random_bn: drawn as a horizontal line
CLASSIFY_TEST = re.compile(r"acc_(.+)_test$")  # acc_<model>_test (own BatchNorm statistics)
EMA_MARKERS = ("s", "^", "v", "D", "P", "X", "*", "h")


def training_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """Panels ``{"loss", "learning rate", "teacher momentum", "kNN top-1", "test top-1"}`` of
    one run; an accuracy series is named by its model (``teacher``, ``student``, ``ema_<ρ>``)."""
    panels: dict[str, Series] = {name: {} for name in (*TRAIN_PANELS, *ACCURACY_PANELS)}

    def add(panel: str, name: str, r: Mapping[str, Any], value: Any) -> None:
        xs, ys = panels[panel].setdefault(name, ([], []))
        xs.append(float(r["samples_seen"]))
        ys.append(float(value))

    for r in records:
        if r.get("event") == "train":
            for panel, keys in TRAIN_PANELS.items():
                for key in keys:
                    if key in r:
                        add(panel, key, r, r[key])
        elif r.get("event") == "eval":
            for key, value in r.items():
                if key.startswith("knn_"):  # knn_teacher, knn_student, knn_ema_<momentum>
                    add("kNN top-1", key[4:], r, value)
                elif (m := CLASSIFY_TEST.match(key)) and value is not None:
                    add("test top-1", m.group(1), r, value)
    return panels


def style(series: str, emas: Sequence[str]) -> dict[str, Any]:
    """Line style of a series, the same in every run: what it is, never which run it is."""
    if series in ("momentum", "loss", "lr"):
        return {"linestyle": "-"}
    if series == "momentum_base":
        return {"linestyle": "--"}
    if series in ("teacher", "student"):  # evaluations are sparse: a marker at each
        return {"linestyle": "-" if series == "teacher" else "--", "marker": "o",
                "markersize": 3}
    if series in emas:  # EMA copies, told apart by marker in the order of their momenta
        return {"linestyle": ":", "marker": EMA_MARKERS[emas.index(series) % len(EMA_MARKERS)],
                "markersize": 4}
    return {"linestyle": (0, (1, 1))}


def draw_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """The figure: one panel per quantity that any run has, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: training_curves(records) for name, records in runs.items()}
    panels = [p for p in next(iter(curves.values()))
              if p in TRAIN_PANELS or any(c[p] for c in curves.values())]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, (run, run_panels) in enumerate(curves.items()):
            colour = colours[i % len(colours)]
            prefix = "" if len(runs) == 1 else f"{run} "
            series = run_panels[panel]
            emas = sorted((s for s in series if s.startswith("ema_")),
                          key=lambda s: float(s[4:]))
            for name, (xs, ys) in series.items():
                if name == FLOOR:
                    ax.axhline(ys[0], color=colour, linestyle="-.", linewidth=1, alpha=0.7,
                               label=f"{prefix}floor (random, BN recomputed)")
                elif name != "random":  # the initial statistics' score: the curves' first point
                    ax.plot(xs, ys, color=colour, label=f"{prefix}{name}", **style(name, emas))
        ax.set(title=panel, xlabel="samples seen")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """Write `draw_training_curves`'s figure as a PNG."""
    import matplotlib.pyplot as plt

    fig = draw_training_curves(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
