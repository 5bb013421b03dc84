"""The end-of-run report of a kNN run: the table of kNN accuracy of the teacher, the student and a
random backbone (with its initial BatchNorm statistics and with statistics recomputed on training
images), one line saying what the table shows, where the run is and what to try next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The recomputed-statistics row is the fair floor: a random network whose activations are merely
# normalised. A teacher within a few test images of it has not shown that it learnt anything.
CLEAR_MARGIN = 0.03


def knn_table(result: dict[str, float], trainer: Any) -> str:
    cfg = trainer.cfg
    n_test = len(trainer.data.test_eval)
    rows = [("teacher (EMA of student)", result["knn_teacher"]),
            ("student", result["knn_student"]),
            ("random init backbone", result["knn_random"])]
    if "knn_random_bn" in result:  # the same weights, BatchNorm statistics recomputed
        rows.append(("random init, BN recomputed", result["knn_random_bn"]))
    lines = [
        f"kNN top-1 (k={cfg.eval.knn_k}, t={cfg.eval.knn_temperature}) on {n_test} held-out "
        f"{cfg.data.dataset} images after {int(result['step'])} steps:",
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
        lines.append("  accelerate launch tools/train.py recipes/byol_r18.yaml   "
                     "# BYOL on CIFAR-10 (a GPU; data.root)")
    return "\n".join(lines)


def knn_report(result: dict[str, float], trainer: Any) -> str:
    """Table, verdict, run directory and next commands: what `tools/train.py` prints."""
    return "\n".join([knn_table(result, trainer), verdict(result),
                      next_steps(trainer.run_dir, trainer.cfg.data.dataset)])
