"""End to end: a tiny supervised run with an EMA -> ``tools/eval.py --protocol classifier``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_ema.config import load_config
from ssl_ema.engine.trainer import Trainer
from tests.helpers import ROOT, load_tool

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

ROLES = ("student", "teacher", "ema_0.5")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps of the supervised digits recipe at 8 px, one extra EMA, a 20% validation split;
    evaluated on 128 images of each split."""
    out = tmp_path_factory.mktemp("supervised")
    cfg = load_config(ROOT / "recipes" / "supervised_ema_digits.yaml",
                      ["data.image_size=8", "data.num_workers=0", "train.max_steps=6",
                       "eval.every_epochs=0", "ema.extra_momenta=[0.5]",
                       "ema.recompute_bn_batches=1", "data.eval_subset=128",
                       f"run.output_dir={out}"])
    Trainer(cfg, out / "run").fit()
    return out / "run"


def test_classifier_protocol_reproduces_the_trainers_numbers_and_compares_runs(
        run_dir: Path, tmp_path: Path) -> None:
    ckpt = run_dir / "checkpoints" / "step_00000006"
    out = tmp_path / "eval.json"
    # the same weights reached by two paths stand in for two seeds: churn across "runs" is 0
    assert load_tool("eval").main([str(run_dir), str(ckpt), "--protocol", "classifier",
                              "--roles", *ROLES, "best_ema", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    trained = json.loads((run_dir / "results.json").read_text())
    got = doc["results"][str(run_dir)]
    # the run's recompute_bn_batches (1): every role also with recomputed statistics
    assert set(got) == {*ROLES, "best_ema", *(f"{r}+bn" for r in (*ROLES, "best_ema"))}
    # best_ema: the early-stopping choice as saved, with the statistics it was chosen with
    assert got["best_ema"]["accuracy"] == pytest.approx(trained["best_ema"]["test"], abs=1e-7)
    assert got["best_ema"]["val_accuracy"] == pytest.approx(trained["best_ema"]["val"],
                                                            abs=1e-7)
    for role in ROLES:
        for name, suffix in ((role, ""), (f"{role}+bn", "_bn")):
            m = got[name]
            # the run's own classifier, not a probe: the trainer's top-1, NLL and ECE-15
            assert m["accuracy"] == pytest.approx(trained[f"acc_{role}_test{suffix}"], abs=1e-7)
            assert m["val_accuracy"] == pytest.approx(trained[f"acc_{role}_val{suffix}"],
                                                      abs=1e-7)
            assert m["nll"] == pytest.approx(trained[f"nll_{role}_test{suffix}"], rel=1e-4)
            assert m["ece_15"] == pytest.approx(trained[f"ece_{role}_test{suffix}"], abs=1e-4)
            assert m["temperature"] > 0 and 0 <= m["brier"] <= 2 and 0 <= m["ece_100"] <= 1
    # 6 steps: BatchNorm recomputation changes the student (its running statistics lag)
    assert got["student+bn"]["nll"] != got["student"]["nll"]
    agreement = doc["consistency"]
    for role in (*ROLES, "best_ema"):
        across = agreement[f"{role} across runs"][f"{run_dir} vs {ckpt}"]
        assert across == {"churn": 0.0, "js_divergence": 0.0}
    pair = agreement[f"roles in {run_dir}"]["student vs teacher"]
    # two classifiers that differ in accuracy by d disagree on at least d of the inputs
    assert abs(got["student"]["accuracy"] - got["teacher"]["accuracy"]) <= pair["churn"] + 1e-9
    assert out.with_name("eval-reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_classifier_protocol_without_recomputation_scores_own_statistics_only(
        run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "own.json"
    assert load_tool("eval").main([str(run_dir), "--protocol", "classifier", "--recompute-bn", "0",
                              "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"][str(run_dir)]
    trained = json.loads((run_dir / "results.json").read_text())
    assert set(got) == {"teacher", "student"}  # the default roles
    assert got["teacher"]["accuracy"] == pytest.approx(trained["acc_teacher_test"], abs=1e-7)
