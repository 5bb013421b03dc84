"""The ema-benefits analysis (gain, churn, calibration) on fixed records: it can hold, it can
fail on each claim, and it waits for its seeds."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ssl_ema.eval.early_stopping import decode_predictions, encode_predictions
from ssl_ema.reproduce.ema_benefits import best_on_val, churn, ema_benefits
from ssl_ema.reproduce.study import FAILS, HOLDS, TOO_FEW, Study

STUDY = Study(name="eb", title="t", claim="c", paper="p", schedule="s", recipe="r",
              variants=())
LABELS = {"clean": "clean", "worse": "worse"}
N = 1000


def preds(seed: int, wrong: int) -> str:
    """Test predictions of class 0 except ``wrong`` seeded positions (disagreement = churn)."""
    p = np.zeros(N, dtype=np.int64)
    p[np.random.default_rng(seed).choice(N, wrong, replace=False)] = 1
    return encode_predictions(torch.from_numpy(p))


def record(variant: str, seed: int, last: float, ema: float, ece_last: float, ece_ema: float,
           churn_last: int, churn_ema: int) -> dict[str, Any]:
    """Two evaluations after step 0; the student peaks at epoch 1 on validation, the teacher at
    epoch 2 (its validation is highest there, its test too)."""
    def ev(epoch: int, s_val: float, s_test: float, t_val: float, t_test: float) -> dict:
        out = {"epoch": epoch, "step": 10 * epoch, "samples_seen": 100 * epoch}
        for m, val, test, ece in (("student", s_val, s_test, ece_last),
                                  ("teacher", t_val, t_test, ece_ema)):
            for sfx in ("", "_bn"):
                out.update({f"acc_{m}_val{sfx}": val, f"acc_{m}_test{sfx}": test,
                            f"nll_{m}_test{sfx}": 1.0, f"ece100_{m}_test{sfx}": ece})
        return out

    curve = [ev(0, 0.1, 0.1, 0.1, 0.1), ev(1, 0.6, last, 0.5, ema - 0.05),
             ev(2, 0.55, last - 0.1, 0.7, ema)]
    choice = {"bn_recomputed": False, "step": 0, "val": 0.0, "test": 0.0}
    return {"variant": variant, "seed": seed, "curve": curve, "metrics": {},
            "predictions": {
                "student": {**choice, "model": "student", "epoch": 1,
                            "test_predictions": preds(seed, churn_last)},
                "ema": {**choice, "model": "teacher", "epoch": 2,
                        "test_predictions": preds(seed + 100, churn_ema)}}}


def runs(worse_gain: float = 0.08, churn_ema: int = 20, ece_ema: float = 0.02) -> list[dict]:
    out = []
    for seed in (0, 1):
        out.append(record("clean", seed, 0.80, 0.805, 0.05, 0.02, 60, 20))
        out.append(record("worse", seed, 0.60, 0.60 + worse_gain, 0.10, ece_ema, 60, churn_ema))
    return out


def test_predictions_round_trip() -> None:
    p = torch.tensor([0, 9, 3, 255, 1000])
    assert decode_predictions(encode_predictions(p)).tolist() == p.tolist()


def test_best_on_val_takes_each_models_own_epoch() -> None:
    r = record("clean", 0, 0.8, 0.85, 0.05, 0.02, 10, 5)
    assert best_on_val(r, "student", False)["epoch"] == 1
    assert best_on_val(r, "teacher", True)["test"] == 0.85


def test_churn_counts_disagreements() -> None:
    a, b = record("w", 0, 0.6, 0.6, 0.1, 0.1, 50, 10), record("w", 1, 0.6, 0.6, 0.1, 0.1, 50, 10)
    pa = decode_predictions(a["predictions"]["student"]["test_predictions"])
    pb = decode_predictions(b["predictions"]["student"]["test_predictions"])
    assert churn(a, b, "student") == np.mean(pa != pb) and 0.05 < churn(a, b, "student") <= 0.1


def test_all_three_claims_hold() -> None:
    a = ema_benefits(LABELS)(STUDY, runs())
    assert a.verdict == HOLDS, a.summary
    assert "clean 0.5 ± 0.0 points, worse 8.0 ± 0.0 points" in a.summary
    assert "gain holds, churn holds, calibration holds" in a.summary
    assert any(row.startswith("| teacher |") for row in a.table)


def test_each_claim_can_fail() -> None:
    # the noisy gain no larger than the clean one
    assert "gain does not hold" in ema_benefits(LABELS)(STUDY, runs(worse_gain=0.004)).summary
    # the EMAs churn more than the last iterates under noise
    a = ema_benefits(LABELS)(STUDY, runs(churn_ema=200))
    assert a.verdict == FAILS and "churn does not hold" in a.summary
    # the EMA worse calibrated under noise
    a = ema_benefits(LABELS)(STUDY, runs(ece_ema=0.2))
    assert a.verdict == FAILS and "calibration does not hold" in a.summary


def test_it_waits_for_both_seeds() -> None:
    a = ema_benefits(LABELS)(STUDY, runs()[:3])
    assert a.verdict == TOO_FEW and "worse 1" in a.summary
