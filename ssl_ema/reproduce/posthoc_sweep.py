"""The verdict of the post-hoc EMA study: a sweep of reconstructed lengths against tracked EMAs.

The study's one run is ``tools/posthoc_ema.py --train``: a supervised run with five tracked
model EMAs and two power EMAs, then the EMAs of several sigma_rel reconstructed from the
snapshots, every model scored on the run's validation and test splits with BatchNorm
statistics recomputed (``+bn``). Its record keeps the tool's JSON as ``result``. As
Morales-Brotons et al. (2024) choose the best EMA, each family's best is chosen on validation
(models tied there: their mean) and compared on test: the post-hoc family holds when its choice
is within ``tolerance`` of the tracked family's choice, or above it. Where the optimum lies is
reported beside the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ssl_ema.reproduce.analyses import AnalysisFn, by_variant
from ssl_ema.reproduce.study import FAILS, HOLDS, TOO_FEW, Analysis, Record, Study

BN = "+bn"
POSTHOC = "posthoc_"


def _chosen(results: Mapping[str, Mapping[str, float]], roles: Sequence[str]
            ) -> tuple[list[str], float, float]:
    """The roles with the best validation accuracy (+bn), that accuracy, and their mean test
    accuracy: a small validation split ties often, and a tie is not a choice."""
    def val(r: str) -> float:
        return results[r + BN].get("val_accuracy", results[r + BN]["accuracy"])

    best = max(val(r) for r in roles)
    tied = [r for r in roles if val(r) == best]
    return tied, best, sum(results[r + BN]["accuracy"] for r in tied) / len(tied)


def _named(roles: Sequence[str], best_val: float) -> str:
    names = ", ".join(roles)
    return (f"{names} (tied on validation at {100 * best_val:.1f}%, test averaged)"
            if len(roles) > 1 else names)


def _row(role: str, scores: Mapping[str, float], note: str = "") -> str:
    val = scores.get("val_accuracy")
    return (f"| {role}{note} | {'-' if val is None else f'{100 * val:.1f}'} | "
            f"{100 * scores['accuracy']:.1f} | {scores.get('ece_15', float('nan')):.3f} | "
            f"{scores.get('nll', float('nan')):.3f} |")


def posthoc_sweep(variant: str, tolerance: float = 0.01) -> AnalysisFn:
    """Does the post-hoc EMA chosen on validation match (within ``tolerance`` of test
    accuracy) or beat the tracked EMA chosen on validation? And where is its optimum?"""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records).get(variant)
        if not runs:
            return Analysis(TOO_FEW, f"run missing: {variant}")
        result: dict[str, Any] = runs[0]["result"]
        scores = result["results"]
        posthoc = sorted((r for r in scores if r.startswith(POSTHOC) and not r.endswith(BN)),
                         key=lambda r: float(r[len(POSTHOC):]))
        tracked = [r for r in scores if not r.endswith(BN) and not r.startswith(POSTHOC)
                   and r != "student"]
        best_p, val_p, p = _chosen(scores, posthoc)
        best_t, val_t, t = _chosen(scores, tracked)
        gap = p - t
        sigmas = [r[len(POSTHOC):] for r in best_p]
        edge = bool({posthoc[0], posthoc[-1]} & set(best_p))
        where = (f"the validation optimum is σ_rel = {', '.join(sigmas)}"
                 + (" (it includes an end of the sweep: the optimum may lie beyond it)" if edge
                    else f", inside the sweep {posthoc[0][len(POSTHOC):]} … "
                    f"{posthoc[-1][len(POSTHOC):]}"))
        summary = (f"post-hoc choice {_named(best_p, val_p)}: test {100 * p:.1f}% against the "
                   f"tracked choice {_named(best_t, val_t)}: {100 * t:.1f}% ({100 * gap:+.1f} "
                   f"points; holds at ≥ {-100 * tolerance:.1f}); {where}; student "
                   f"{100 * scores['student' + BN]['accuracy']:.1f}%; every model with "
                   "BatchNorm recomputed, chosen on validation.")
        errors = result.get("posthoc", {})
        rows = ["| model (+bn) | val % | test % | ECE (15) | NLL |", "|---|---|---|---|---|"]
        for role in [*tracked, "student", *posthoc]:
            sigma = role[len(POSTHOC):]
            note = (f" (profile error {errors[sigma]['profile_error']:.3f})"
                    if sigma in errors else "")
            rows.append(_row(role, scores[role + BN], note))
        return Analysis(HOLDS if gap >= -tolerance - 1e-12 else FAILS, summary, tuple(rows))

    return analyse
