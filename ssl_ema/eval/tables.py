"""The end-of-run reports `tools/train.py` prints, for both kinds of evaluation.

- kNN runs (BYOL, DINO): kNN accuracy of the teacher, the student and a random backbone (with its
  initial BatchNorm statistics and with statistics recomputed on training images), one line
  saying what the table shows, where the run is and what to try next.
- Classification runs (supervised, pseudo_label): top-1 of every model, with and without
  BatchNorm recomputation, their calibration on the test split (ECE, NLL; validation values are
  in metrics.jsonl), and the EMA early-stopping choice. Each EMA is named by its momentum per
  optimizer step at the reference batch (as in the recipe) and per update (``** ema.period``:
  the paper's alpha, e.g. 0.99797 every 16 steps = 0.968).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ssl_ema.config import Config
from ssl_ema.momentum import update_momentum

# The recomputed-statistics row is the fair floor: a random network whose activations are merely
# normalised. A teacher within a few test images of it has not shown that it learnt anything.
CLEAR_MARGIN = 0.03


# ----------------------------------------------------------------------------- kNN runs
def knn_table(result: dict[str, float], cfg: Config, test_images: int) -> str:
    rows = [("teacher (EMA of student)", result["knn_teacher"]),
            ("student", result["knn_student"]),
            ("random init backbone", result["knn_random"])]
    if "knn_random_bn" in result:  # the same weights, BatchNorm statistics recomputed
        rows.append(("random init, BN recomputed", result["knn_random_bn"]))
    lines = [
        f"kNN top-1 (k={cfg.eval.knn_k}, t={cfg.eval.knn_temperature}) on {test_images} "
        f"held-out {cfg.data.dataset} images after {int(result['step'])} steps:",
        f"  {'model':<26} {'accuracy':>8}",
        *(f"  {name:<26} {acc:>8.4f}" for name, acc in rows),
    ]
    best = [f"{role} {result[f'best_knn_{role}']:.4f} (epoch {result[f'best_knn_{role}_epoch']})"
            for role in ("teacher", "student") if f"best_knn_{role}" in result]
    if best:  # the maximum over the evaluations, as lightly's benchmarks report
        lines.append(f"  best over evaluations: {', '.join(best)}")
    return "\n".join(lines)


def verdict(result: dict[str, float]) -> str:
    """One line: does the teacher clear the fair floor (random weights, recomputed statistics)?"""
    if "knn_random_bn" not in result:
        return "No fair floor for this run (resumed from a run that did not measure it)."
    gap = 100 * (result["knn_teacher"] - result["knn_random_bn"])
    floor = "the fair floor (the same random weights, BatchNorm statistics recomputed)"
    if gap >= 100 * CLEAR_MARGIN:
        return f"The teacher is {gap:.1f} points above {floor}: it learnt features."
    return f"The teacher is {gap:+.1f} points from {floor}: not evidence that it learnt features."


def next_steps(run_dir: Path, dataset: str) -> str:
    """Where the run is and the commands to try on it next."""
    lines = [f"Run: {run_dir}",
             "Next:",
             f"  python tools/eval.py {run_dir} --protocol linear   # linear probe, calibration",
             f"  python tools/export.py {run_dir}   # teacher as a timm-loadable safetensors file"]
    if dataset == "digits":
        lines.append("  python tools/train.py recipes/byol_r18.yaml   "
                     "# BYOL on CIFAR-10 (a GPU; data.root)")
    return "\n".join(lines)


def knn_report(result: dict[str, float], cfg: Config, test_images: int, run_dir: Path) -> str:
    """Table, verdict, run directory and next commands."""
    return "\n".join([knn_table(result, cfg, test_images), verdict(result),
                      next_steps(run_dir, cfg.data.dataset)])


# ----------------------------------------------------------------------------- classification
COLUMNS = [("val", "val"), ("val_bn", "val+BN"), ("test", "test"), ("test_bn", "test+BN")]


def _label(name: str, momentum_start: float, period: int) -> str:
    """The role with its momentum per step and, every ``period`` steps, per update (at the
    reference batch: `ssl_ema.momentum.update_momentum`)."""
    if name == "student":
        return "last iterate (student)"
    momentum = momentum_start if name == "teacher" else float(name.removeprefix("ema_"))
    per_update = update_momentum(momentum, period=period)
    return f"{name} ({momentum:.5g}, {per_update:.4g}/upd)" if period > 1 else \
        f"{name} ({momentum:.5g})"


def _choice(kind: str, c: dict[str, Any]) -> str:
    bn = ", BN recomputed" if c["bn_recomputed"] else ""
    return (f"best {kind} on validation: {c['model']}{bn} at epoch {c['epoch']} "
            f"(step {c['step']}): val {c['val']:.4f}, test {c['test']:.4f}")


def classification_table(result: dict[str, Any], cfg: Config, roles: Sequence[str],
                         held_out: Mapping[str, int]) -> str:
    """Top-1 of each role (rows) per split, with/without recomputed BatchNorm (columns); then
    calibration, the pseudo-labels of the last epoch and the early-stopping choices."""
    cols = [(k, title) for k, title in COLUMNS if f"acc_student_{k}" in result]
    n_bn = cfg.ema.recompute_bn_batches
    lines = [f"top-1 accuracy after {int(result['step'])} steps on "
             + ", ".join(f"{n} {split}" for split, n in held_out.items())
             + f" {cfg.data.dataset} images"
             + (f" (+BN: statistics recomputed on {n_bn} training batches)" if n_bn else ""),
             f"  {'model':<36}" + "".join(f" {title:>8}" for _, title in cols)]
    for name in roles:
        row = [result.get(f"acc_{name}_{k}") for k, _ in cols]
        lines.append(f"  {_label(name, cfg.method.momentum, cfg.ema.period):<36}"
                     + "".join(f" {v:>8.4f}" for v in row if v is not None))
    lines += _calibration_rows(result, cfg, roles, held_out["test"])
    if "mask_rate" in result:
        masked = result.get("pseudo_label_accuracy", float("nan"))
        lines.append(f"pseudo-labels in the last epoch: mask rate {result['mask_rate']:.3f}, "
                     f"accuracy {masked:.4f} (above tau), "
                     f"{result['pseudo_label_accuracy_all']:.4f} (all)")
    for kind in ("ema", "student"):
        if f"best_{kind}" in result:
            lines.append(_choice("EMA" if kind == "ema" else "last iterate",
                                 result[f"best_{kind}"]))
    return "\n".join(lines)


def _calibration_rows(result: dict[str, Any], cfg: Config, roles: Sequence[str],
                      test_images: int) -> list[str]:
    """A second, compact table: ECE-15 and NLL on test, own and recomputed BN statistics."""
    cols = [(f"{metric}_{{}}_{split}", title) for split, bn in (("test", ""), ("test_bn", "+BN"))
            for metric, title in (("ece", f"ECE{bn}"), ("nll", f"NLL{bn}"))]
    cols = [(key, title) for key, title in cols if key.format("student") in result]
    if not cols:
        return []
    lines = [f"calibration on {test_images} test images (ECE: 15 equal-mass bins; NLL: nats)",
             f"  {'model':<36}" + "".join(f" {title:>8}" for _, title in cols)]
    for name in roles:
        lines.append(f"  {_label(name, cfg.method.momentum, cfg.ema.period):<36}"
                     + "".join(f" {result[key.format(name)]:>8.4f}" for key, _ in cols))
    return lines
