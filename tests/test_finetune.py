"""tools/finetune.py: an exported teacher backbone fine-tuned end to end (supervised recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.eval.trained import load_run
from ssl_ema.models.export import load_backbone
from tests.helpers import ROOT, load_tool

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

RECIPE = str(ROOT / "recipes" / "finetune_digits.yaml")
FAST = ["data.image_size=8", "train.epochs=1", "train.max_steps=2", "eval.every_epochs=0",
        "data.eval_subset=64", "ema.recompute_bn_batches=0"]


@pytest.fixture(scope="module")
def export(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "teacher.safetensors"
    assert load_tool("export").main([str(run_dir), "--out", str(out)]) == 0
    return out


def test_finetuning_starts_from_the_exported_backbone(export: Path, tmp_path: Path) -> None:
    # lr 0 and no weight decay: after the steps the student's weights are still the export's
    argv = [str(export), RECIPE, *FAST, f"run.output_dir={tmp_path}", "run.name=ft",
            "optim.lr=1e-12", "optim.weight_decay=0"]
    assert load_tool("finetune").main(argv) == 0
    run = next((tmp_path / "ft").iterdir())
    cfg = (run / "config.yaml").read_text()
    assert "backbone: resnet10t" in cfg and str(export.resolve()) in cfg
    student = load_run(run).method.student_backbone
    exported = load_backbone(export)
    for (name, a), b in zip(student.named_parameters(), exported.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 2 and [c.name for c in checkpoints(run)] == ["step_00000002"]


def test_finetuning_learns(export: Path, tmp_path: Path) -> None:
    argv = [str(export), RECIPE, *FAST, "train.max_steps=30", "train.epochs=2",
            f"run.output_dir={tmp_path}", "run.name=ft"]
    assert load_tool("finetune").main(argv) == 0
    run = next((tmp_path / "ft").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["acc_student_test"] > 0.5  # 10 classes; a random classifier scores ~0.1


@pytest.mark.parametrize(("extra", "message"), [
    (["method.name=byol"], "model.init_from apply to the methods supervised, pseudo_label"),
    (["data.dataset=cifar10", "data.root=/nonexistent"], "CIFAR-10 not found"),
])
def test_bad_input_is_one_line_and_exit_2(export: Path, tmp_path: Path, extra: list[str],
                                          message: str, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    argv = [str(export), RECIPE, *FAST, f"run.output_dir={tmp_path}", *extra]
    assert load_tool("finetune").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_missing_export_is_one_line_and_exit_2(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert load_tool("finetune").main([str(tmp_path / "none.safetensors"), RECIPE]) == 2
    assert "does not exist" in capsys.readouterr().err
