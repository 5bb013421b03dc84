"""The EMA Scaling Rule's figure from a stored study (``docs/results/<study>.json``): the teacher's
(EMA's) and the student's accuracy against samples seen, one colour per κ, solid with the rule
and dashed without it (Busbridge et al. 2023, Fig. 1's reading: with the rule the curves at
every κ lie on κ = 1's).

κ of a run is its effective batch over ``scaling.reference_batch``, read from the stored config;
a progressive run (``train.batch_schedule``) is labelled by its first and last κ. Each line is
the mean over the variant's seeds (`analyses.mean_curve`), each seed drawn faintly beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ssl_ema.reproduce.analyses import by_variant, mean_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# What each panel plots, first key present in the curves: classification runs log acc_*_test,
# the self-supervised ones knn_*.
ROLE_KEYS = {"teacher (EMA)": ("acc_teacher_test", "knn_teacher"),
             "student": ("acc_student_test", "knn_student")}
RULE_STYLE = {"ema": "-", "optimizer": "--", "none": ":"}


def kappa_label(config: Mapping[str, Any]) -> str:
    """``κ = 4`` (or ``κ = 1→8`` for a batch schedule) of a stored run's config."""
    reference = config["scaling"]["reference_batch"]
    batches = [config["train"]["batch_size"],
               *(b for _, b in config["train"].get("batch_schedule") or ())]

    def fmt(b: int) -> str:
        return f"{b / reference:g}"

    first, last = fmt(batches[0]), fmt(batches[-1])
    return f"κ = {first}" if first == last else f"κ = {first}→{last}"


def _key(records: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> str | None:
    return next((k for k in candidates if any(k in e for r in records for e in r["curve"])),
                None)


def _draw_variant(ax: Any, records: Sequence[Mapping[str, Any]], key: str, colour: str) -> None:
    """One variant's seeds (faint) and their mean, in its κ's colour and its rule's style."""
    config = records[0]["config"]
    rule = config["scaling"]["rule"]
    linestyle = RULE_STYLE.get(rule, "-.")
    for r in records:
        seed = [(e["samples_seen"], e[key]) for e in r["curve"] if key in e]
        if seed:
            ax.plot(*zip(*seed), color=colour, linestyle=linestyle, alpha=0.25, linewidth=0.8)
    if mean := mean_curve(records, key):
        ax.plot(*zip(*mean), color=colour, linestyle=linestyle, marker="o", markersize=3,
                label=f"{kappa_label(config)}, rule {rule} ({len(records)} seeds)")


def draw_scaling_figure(study: Mapping[str, Any]) -> Figure:
    """The figure of a loaded study file; a ValueError when it holds no curves to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in study.get("runs", []) if r.get("curve")]
    if not runs:
        raise ValueError(f"study '{study.get('study')}' has no stored runs with curves yet; "
                         "run it first: python tools/reproduce.py run STUDY --budget ...")
    variants = by_variant(runs)
    kappas = sorted({kappa_label(r["config"]) for r in runs},
                    key=lambda k: [float(x) for x in k[4:].split("→")])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of = {k: colours[i % len(colours)] for i, k in enumerate(kappas)}
    fig, axes = plt.subplots(1, len(ROLE_KEYS), figsize=(5.5 * len(ROLE_KEYS), 4),
                             squeeze=False)
    for ax, (role, candidates) in zip(axes[0], ROLE_KEYS.items()):
        key = _key(runs, candidates)
        for records in variants.values() if key is not None else ():
            _draw_variant(ax, records, str(key), colour_of[kappa_label(records[0]["config"])])
        ax.set(title=f"{role}: {key}", xlabel="samples seen", ylabel="accuracy")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{study.get('study', '')}: EMA Scaling Rule, solid with it, dashed without")
    fig.tight_layout()
    return fig
