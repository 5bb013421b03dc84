"""The verdict on Morales-Brotons et al. (TMLR 2024)'s claims from supervised runs with five EMAs.

Each run evaluates the last iterate (the student) and every EMA, with their own and with
recomputed BatchNorm statistics, on a validation split carrying the training labels (noisy ones
under label noise) and on the clean test set; EMA early stopping keeps the best EMA and the best
last iterate on validation accuracy with their test predictions (`eval.early_stopping`). From
the records alone:

- **gain**: the best EMA's test accuracy minus the best last iterate's (each chosen on
  validation, Sec. 4), per seed; claimed positive, and larger under label noise (Sec. 5.2);
- **churn**: the share of test images on which the two seeds' chosen models disagree, for the
  EMAs and for the last iterates (Sec. 6); claimed lower for the EMAs;
- **calibration**: test ECE (100 equal-mass bins, as the paper) of the chosen models; claimed
  lower for the EMAs.

Every model (and BatchNorm treatment) is also reported at its own best-on-validation epoch, so
the table shows which EMA wins and what recomputing the statistics does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ssl_ema.engine.sweep import mean_std
from ssl_ema.eval.early_stopping import decode_predictions
from ssl_ema.reproduce.analyses import AnalysisFn, by_variant
from ssl_ema.reproduce.study import FAILS, HOLDS, TOO_FEW, Analysis, Record, Study

ECE = "ece100"  # the paper's ECE: 100 equal-mass bins


def _pts(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _spread(values: Sequence[float]) -> str:
    """``mean ± sd`` in points over seeds (sd only with two or more)."""
    m, sd = mean_std(list(values))
    return _pts(m) if len(values) < 2 else f"{_pts(m)} ± {_pts(sd)}"


def models_of(record: Record) -> list[str]:
    """The evaluated models of a run, in the order of its keys: student, teacher, ema_*."""
    first = record["curve"][-1]
    names = [k[len("acc_"):-len("_test")] for k in first
             if k.startswith("acc_") and k.endswith("_test")]
    return sorted(names, key=lambda n: (n != "student", n != "teacher", n))


def best_on_val(record: Record, model: str, bn: bool) -> dict[str, float]:
    """``model``'s (test accuracy, test ECE, test NLL, epoch) at its best validation accuracy
    over the run's evaluations after step 0 (earliest wins ties)."""
    suffix = "_bn" if bn else ""
    evals = [e for e in record["curve"] if e.get("step", 1) > 0
             and f"acc_{model}_val{suffix}" in e]
    best = max(evals, key=lambda e: (e[f"acc_{model}_val{suffix}"], -e["step"]))
    return {"test": best[f"acc_{model}_test{suffix}"], "ece": best.get(f"{ECE}_{model}_test"
                                                                      f"{suffix}", math.nan),
            "nll": best[f"nll_{model}_test{suffix}"], "epoch": best["epoch"],
            "val": best[f"acc_{model}_val{suffix}"]}


def chosen(record: Record, kind: str) -> dict[str, float]:
    """Early stopping's choice of ``kind`` ("ema" or "student") with its test ECE and NLL."""
    c = record["predictions"][kind]
    return best_on_val(record, c["model"], bool(c["bn_recomputed"]))


def churn(a: Record, b: Record, kind: str) -> float:
    """Share of test images on which two runs' chosen ``kind`` models disagree."""
    pa, pb = (decode_predictions(r["predictions"][kind]["test_predictions"]) for r in (a, b))
    return float(np.mean(pa != pb))


def _per_model_rows(runs: Mapping[str, Sequence[Record]], labels: Mapping[str, str]
                    ) -> list[str]:
    """Each model's best-on-validation test accuracy, own / recomputed statistics."""
    head = " | ".join(f"{labels[n]}: own BN | {labels[n]}: BN recomputed" for n in labels)
    rows = [f"| model | {head} |", "|---" * (1 + 2 * len(labels)) + "|"]
    for model in models_of(next(iter(runs.values()))[0]):
        cells = [_spread([best_on_val(r, model, bn)["test"] for r in runs[n]])
                 for n in labels for bn in (False, True)]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return rows


def ema_benefits(labels: Mapping[str, str], seeds: int = 2) -> AnalysisFn:
    """``labels``: variant -> label, clean first and the noisiest last."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records)
        short = [n for n in labels if len(runs.get(n, [])) < seeds]
        if short:
            have = ", ".join(f"{n} {len(runs.get(n, []))}" for n in labels)
            return Analysis(TOO_FEW, f"needs {seeds} seeds of each variant (have: {have})")
        rows = ["| labels | best last iterate | best EMA | gain (points) | churn: last "
                "iterates | churn: EMAs | ECE: last iterate | ECE: EMA |",
                "|---|---|---|---|---|---|---|---|"]
        gains, churns, eces = {}, {}, {}
        for n, label in labels.items():
            rs = sorted(runs[n], key=lambda r: r["seed"])[:seeds]
            last, ema = [chosen(r, "student") for r in rs], [chosen(r, "ema") for r in rs]
            gains[n] = [e["test"] - s["test"] for e, s in zip(ema, last)]
            churns[n] = (churn(rs[0], rs[1], "student"), churn(rs[0], rs[1], "ema"))
            eces[n] = (mean_std([s["ece"] for s in last])[0],
                       mean_std([e["ece"] for e in ema])[0])
            rows.append(f"| {label} | {_spread([s['test'] for s in last])} | "
                        f"{_spread([e['test'] for e in ema])} | {_spread(gains[n])} | "
                        f"{_pts(churns[n][0])} | {_pts(churns[n][1])} | "
                        f"{_pts(eces[n][0])} | {_pts(eces[n][1])} |")
        mean_gain = {n: mean_std(g)[0] for n, g in gains.items()}
        clean, noisy = next(iter(labels)), list(labels)[-1]
        claims = {
            "gain": all(g > 0 for g in mean_gain.values())
            and mean_gain[noisy] > mean_gain[clean],
            "churn": all(e < s for s, e in churns.values()),
            "calibration": all(e < s for s, e in eces.values()),
        }
        summary = ("best EMA over best last iterate (test accuracy, each chosen on validation): "
                   + ", ".join(f"{labels[n]} {_spread(g)} points" for n, g in gains.items())
                   + "; churn between seeds, last iterates → EMAs: "
                   + ", ".join(f"{labels[n]} {_pts(s)}% → {_pts(e)}%"
                               for n, (s, e) in churns.items())
                   + "; test ECE (100 bins): "
                   + ", ".join(f"{labels[n]} {_pts(s)} → {_pts(e)}" for n, (s, e) in eces.items())
                   + ". Claims: " + ", ".join(f"{c} {HOLDS if ok else FAILS}"
                                              for c, ok in claims.items()) + ".")
        table = (*rows, "", "Each model at its own best validation epoch (test accuracy, "
                 "mean ± sd over seeds):", "", *_per_model_rows(runs, labels))
        return Analysis(HOLDS if all(claims.values()) else FAILS, summary, table)

    return analyse
