"""Supervised training with model EMAs and pseudo-labelling with an EMA teacher, on CPU digits."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ssl_ema.config import ConfigError, load_config
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer
from ssl_ema.eval.calibration import calibration_metrics
from ssl_ema.losses.pseudo_label import pseudo_label_loss, pseudo_labels
from ssl_ema.methods import build_method
from tests.helpers import ROOT, resume_from

spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
assert spec is not None and spec.loader is not None
train_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_tool)

SMALL = ["data.image_size=8", "data.num_workers=0", "model.backbone=test_resnet",
         "model.cifar_stem=false", "train.log_every=1"]


def test_confidence_mask_rate_and_pseudo_label_accuracy() -> None:
    # Teacher probabilities chosen exactly: rows 0 and 2 reach tau = 0.9, rows 1 and 3 do not.
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9],
                          [0.1, 0.85, 0.05]])
    targets = pseudo_labels(probs.log(), threshold=0.9)
    assert targets.labels.tolist() == [0, 0, 2, 1]
    assert targets.mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert float(targets.mask_rate) == 0.5
    assert targets.confidence.tolist() == pytest.approx([0.95, 0.5, 0.9, 0.85])
    correct, masked = targets.accuracy(torch.tensor([0, 1, 1, 1]))  # row 2 is wrong
    assert (float(correct), float(masked)) == (1.0, 2.0)
    student = torch.randn(4, 3)
    ce = F.cross_entropy(student, targets.labels, reduction="none")
    # mean over all four unlabelled images, the unmasked contributing zero (FixMatch, Eq. 4)
    assert float(pseudo_label_loss(student, targets)) == pytest.approx(float(ce[[0, 2]].sum() / 4))
    assert float(pseudo_labels(probs.log(), 1.0).mask.sum()) == 0.0


def train(tmp_path: Path, recipe: str, *overrides: str) -> tuple[dict[str, Any], Path]:
    code = train_tool.main([str(ROOT / "recipes" / recipe), f"run.output_dir={tmp_path}",
                            *SMALL, *overrides])
    assert code == 0
    (results,) = tmp_path.glob("*/*/results.json")
    return json.loads(results.read_text()), results.parent


@pytest.mark.slow
def test_supervised_ema_smoke_and_ema_early_stopping(tmp_path: Path, capsys: Any) -> None:
    r, run_dir = train(tmp_path, "supervised_ema_digits.yaml", "train.epochs=3",
                       "ema.extra_momenta=[0.9]", "ema.recompute_bn_batches=1",
                       "eval.every_epochs=1")
    out = capsys.readouterr().out
    assert "last iterate (student)" in out and "best EMA on validation" in out
    assert "calibration on 360 test images" in out
    assert r["step"] == 3 * (1150 // 64) and r["random_init_test"] < 0.3
    for model in ("student", "teacher", "ema_0.9"):
        for key in ("val", "val_bn", "test", "test_bn"):
            assert 0.0 <= r[f"acc_{model}_{key}"] <= 1.0
    assert r["acc_teacher_test"] > 0.5  # chance is 0.1
    # The best EMA is the arg-max of the validation accuracies over every EMA, BN variant and
    # evaluation (earliest first on ties); its test accuracy is the one of that evaluation.
    evals = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1, 2, 3]
    candidates = [(e[f"acc_{m}_val{b}"], -e["epoch"], m, b == "_bn", e[f"acc_{m}_test{b}"])
                  for e in evals for m in ("teacher", "ema_0.9") for b in ("", "_bn")]
    val, neg_epoch, model, bn, test = max(candidates, key=lambda c: (c[0], c[1]))
    best = r["best_ema"]
    assert (best["val"], best["epoch"], best["model"], best["bn_recomputed"], best["test"]) == \
        (val, -neg_epoch, model, bn, test)
    saved = json.loads((run_dir / "best_ema.json").read_text())
    assert saved == best and (run_dir / "best_ema.safetensors").is_file()
    assert r["best_student"]["val"] == max(e[f"acc_student_val{b}"] for e in evals
                                           for b in ("", "_bn"))


@pytest.mark.slow
def test_pseudo_label_smoke(tmp_path: Path) -> None:
    r, run_dir = train(tmp_path, "pseudo_label_digits.yaml", "train.epochs=6",
                       "pseudo_label.threshold=0.7")
    assert r["acc_teacher_test"] > 0.5 and r["acc_student_test"] > 0.5  # 100 labels; chance 0.1
    evals = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "eval"]
    assert "mask_rate" not in evals[0]  # before training: no pseudo-labels yet
    assert len(evals) == 7
    for e in evals[1:]:  # each epoch: mask rate and accuracy of the pseudo-labels
        assert 0.0 <= e["mask_rate"] <= 1.0 and 0.0 <= e["pseudo_label_accuracy_all"] <= 1.0
    # The teacher grew confident, and the threshold keeps its better labels: those above tau
    # are right more often than its labels overall (6 epochs, 100 labels; chance 0.1).
    last = evals[-1]
    assert last["mask_rate"] > 0.0
    assert last["pseudo_label_accuracy"] > max(0.6, last["pseudo_label_accuracy_all"] + 0.1)
    assert last["pseudo_label_accuracy_all"] > 0.3
    assert r["mask_rate"] == last["mask_rate"]
    train_rows = [x for x in read_metrics(run_dir / "metrics.jsonl") if x["event"] == "train"]
    assert all(0.0 <= x["mask_rate"] <= 1.0 for x in train_rows)
    assert all(math.isfinite(x["loss_unlabelled"]) for x in train_rows)


@pytest.mark.slow
def test_pseudo_label_resume_is_bitwise_exact(tmp_path: Path) -> None:
    steps = [*SMALL, "method.name=pseudo_label", "labels.per_class=10", "pseudo_label.mu=2",
             "pseudo_label.threshold=0.5", "train.batch_size=64", "train.epochs=1",
             "train.checkpoint_every=4", "train.keep_checkpoints=5", "optim.name=sgd",
             "eval.every_epochs=0", "method.momentum=0.9", "method.momentum_end=0.9",
             f"run.output_dir={tmp_path}"]
    full = Trainer(load_config(None, steps), tmp_path / "run")
    full.fit()  # 1337 // 2 = 668 items // 64 = 10 steps per epoch
    assert full.state.step == 10
    resume_from(full, tmp_path / "run", 4)  # mid-epoch


@pytest.mark.slow
def test_evaluation_with_batchnorm_recomputation_leaves_the_run_unchanged(tmp_path: Path
                                                                          ) -> None:
    cfg = load_config(ROOT / "recipes" / "supervised_ema_digits.yaml",
                      [*SMALL, "train.max_steps=3", "eval.every_epochs=0",
                       "ema.extra_momenta=[0.5]", "ema.recompute_bn_batches=1",
                       "data.eval_subset=128", f"run.output_dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.evaluate()
    assert result["acc_ema_0.5_val"] != result["acc_ema_0.5_val_bn"] or \
        result["acc_student_test"] != result["acc_student_test_bn"]  # recomputation did act
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # averaged BatchNorm statistics restored
    # NLL and ECE-15 are those of the teacher's own classifier on the test images, from the
    # same logits as its top-1 (checked against calibration.py on a separate forward pass)
    net = torch.nn.Sequential(model.teacher["backbone"], model.teacher["classifier"]).eval()
    x, y = zip(*(trainer.data.test_eval[i] for i in range(len(trainer.data.test_eval))))
    with torch.no_grad():
        ref = calibration_metrics(net(torch.stack(x)), torch.tensor(y))
    assert result["acc_teacher_test"] == pytest.approx(ref["accuracy"], abs=1e-7)
    assert result["nll_teacher_test"] == pytest.approx(ref["nll"], rel=1e-5)
    assert result["ece_teacher_test"] == pytest.approx(ref["ece_15"], abs=1e-6)
    assert result["nll_teacher_test"] > 0 and result["ece_teacher_test"] > 0
    for m in ("student", "teacher", "ema_0.5"):  # every model, split and BatchNorm variant
        assert {f"{k}_{m}_{s}{b}" for k in ("acc", "nll", "ece") for s in ("val", "test")
                for b in ("", "_bn")} <= result.keys()


@pytest.mark.slow
def test_init_from_loads_the_backbone_strictly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = ["method.name=supervised", *SMALL]
    donor = build_method(load_config(None, base), in_chans=1, num_classes=10)
    state = {f"teacher.backbone.{k}": v.contiguous()
             for k, v in donor.teacher["backbone"].state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = load_config(None, [*base, "run.seed=1", f"model.init_from={tmp_path}/model.safetensors",
                             "model.init_prefix=teacher.backbone."])
    model = build_method(cfg, in_chans=1, num_classes=10)
    for role in (model.student, model.teacher):  # the teacher starts as the student
        for k, v in role["backbone"].state_dict().items():
            assert torch.equal(v, state[f"teacher.backbone.{k}"]), k
    wrong = load_config(None, [*base, f"model.init_from={tmp_path}/model.safetensors",
                               "model.backbone=resnet18", "model.init_prefix=teacher.backbone."])
    with pytest.raises(ConfigError, match="does not fit model.backbone"):
        build_method(wrong, in_chans=1, num_classes=10)


@pytest.mark.parametrize(("recipe", "overrides", "message"), [
    ("pseudo_label_digits", ["labels.per_class=0"], "pseudo_label needs a labelled subset"),
    ("supervised_ema_digits", ["labels.noisy=aggre"], "CIFAR-10N labels fit CIFAR-10 only"),
    ("quickstart", ["labels.val_fraction=0.2"], "labels.* and model.init_from apply to"),
    ("supervised_ema_digits", ["model.init_from=nowhere.pt"], "model.init_from: 'nowhere.pt'"),
    ("supervised_ema_digits", ["labels.per_class=200"], "class 0 has only 114"),  # after val
    ("supervised_ema_digits", ["optim.name=lars"], "optim.nesterov: applies to optim.name=sgd"),
    ("pseudo_label_digits", ["pseudo_label.threshold=1.5"], "pseudo_label.threshold: must lie"),
    ("supervised_ema_digits", ["labels.symmetric_noise=1.0"],
     "labels.symmetric_noise: must lie in [0, 1), got 1.0"),
    ("supervised_ema_digits", ["labels.symmetric_noise=-0.1"], "labels.symmetric_noise: must lie"),
    ("supervised_ema_digits", ["labels.symmetric_noise=0.2", "labels.noisy=worse"],
     "labels.symmetric_noise and labels.noisy=worse exclude each other"),
    ("quickstart", ["labels.symmetric_noise=0.2"], "labels.* and model.init_from apply to"),
])
def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: Any, recipe: str,
                                       overrides: list[str], message: str) -> None:
    code = train_tool.main([str(ROOT / "recipes" / f"{recipe}.yaml"),
                            f"run.output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not list(tmp_path.glob("*/*/checkpoints"))  # nothing trained
