"""The end-of-run table: kNN accuracy of the teacher, the student and a random backbone
(with its initial BatchNorm statistics and with statistics recomputed on training images)."""

from __future__ import annotations

from typing import Any


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
