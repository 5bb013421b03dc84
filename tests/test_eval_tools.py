"""End to end: a tiny trained run -> tools/eval.py, export.py, transfer.py, plot.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ssl_ema.eval.trained import load_run
from tests.helpers import load_tool

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_knn_protocol_reproduces_the_trainers_numbers(run_dir: Path) -> None:
    assert load_tool("eval").main([str(run_dir), "--protocol", "knn"]) == 0
    got = read(run_dir / "eval" / "step_00000003-knn.json")["results"][str(run_dir)]
    trained = read(run_dir / "results.json")
    assert got["teacher"]["accuracy"] == pytest.approx(trained["knn_teacher"], abs=1e-7)
    assert got["student"]["accuracy"] == pytest.approx(trained["knn_student"], abs=1e-7)
    assert got["teacher"]["k"] == 5  # the run's eval.knn_k


def test_linear_protocol_calibration_and_churn(run_dir: Path) -> None:
    assert load_tool("eval").main([str(run_dir / "checkpoints" / "step_00000003"),
                              "--protocol", "linear"]) == 0
    doc = read(run_dir / "eval" / "step_00000003-linear.json")
    res = doc["results"][str(run_dir / "checkpoints" / "step_00000003")]
    for role in ("teacher", "student"):
        m = res[role]
        assert m["accuracy"] > 0.5  # 10 classes: chance is 0.1
        assert 0 <= m["ece_15"] <= 1 and m["nll"] > 0 and 0 <= m["brier"] <= 2
        assert m["nll_ts"] <= m["nll"] + 0.05 and m["temperature"] > 0
    pair = doc["consistency"][f"roles in {run_dir / 'checkpoints' / 'step_00000003'}"]
    churn = pair["teacher vs student"]["churn"]
    # two probes that differ in accuracy by d disagree on at least d of the inputs
    assert abs(res["teacher"]["accuracy"] - res["student"]["accuracy"]) <= churn + 1e-9 < 1
    assert (run_dir / "eval" / "step_00000003-linear-reliability.png").stat().st_size > 1000
    assert len(list((run_dir / "eval" / "features").glob("*.safetensors"))) == 4  # cached


def test_exported_teacher_gives_the_teachers_features(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher.safetensors"
    assert load_tool("export").main([str(run_dir), "--out", str(out)]) == 0
    teacher = load_run(run_dir).method.teacher_backbone
    loaded = timm.create_model("resnet10t", pretrained=True, num_classes=0, in_chans=1,
                               pretrained_cfg_overlay={"file": str(out)}).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(teacher(x), loaded(x))


def image_folder(root: Path) -> Path:
    """Two classes, dark and bright 12x10 RGB images: separable by any backbone."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 5)):
        for name, level in (("dark", 40), ("bright", 210)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 15, (12, 10, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_transfer_to_digits_and_an_image_folder(run_dir: Path, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "folder")
    out = tmp_path / "transfer.json"
    assert load_tool("transfer").main([str(run_dir), "--datasets", "digits",
                                       f"imagefolder={folder}", "--roles", "teacher", "student",
                                       "--k", "5", "--out", str(out)]) == 0
    r = read(out)["results"]
    assert (r["digits"]["train_images"], r["digits"]["test_images"]) == (1437, 360)
    digits, trained = r["digits"]["models"], read(run_dir / "results.json")
    assert list(digits) == ["teacher", "student", "random, BN recomputed"]
    # digits standardised with their own pixel statistics is the run's own evaluation input:
    # transfer's kNN reproduces the trainer's, for each role
    for role in ("teacher", "student"):
        assert digits[role]["knn"]["accuracy"] == pytest.approx(trained[f"knn_{role}"], abs=1e-7)
        assert digits[role]["linear"]["accuracy"] > 0.5
    # the floor (random weights drawn with the run's seed by its builder, statistics recomputed
    # on these training images) is the trainer's own fair floor, knn_random_bn
    assert digits["random, BN recomputed"]["knn"]["accuracy"] == pytest.approx(
        trained["knn_random_bn"], abs=1e-7)
    for role in ("teacher", "random, BN recomputed"):
        assert r["imagefolder"]["models"][role]["knn"]["accuracy"] == 1.0
    assert r["imagefolder"]["models"]["teacher"]["linear"]["accuracy"] == 1.0


def test_training_curves_end_at_the_final_evaluation(run_dir: Path, tmp_path: Path) -> None:
    from ssl_ema.engine.tracking import read_metrics
    from ssl_ema.eval.curves import training_curves

    panels = training_curves(read_metrics(run_dir / "metrics.jsonl"))
    final = read(run_dir / "results.json")
    assert panels["kNN top-1"]["teacher"] == ([0.0, 48.0], [final["knn_random"],
                                                            final["knn_teacher"]])
    assert panels["loss"]["loss"][0] == [16.0, 32.0, 48.0]
    assert load_tool("plot").main([str(run_dir), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("name", "args", "message"), [
    ("eval", ["{tmp}/missing", "--protocol", "knn"], "does not exist"),
    ("eval", ["{run}", "--protocol", "svm"],
     "unknown protocol 'svm'; valid: knn, linear, classifier"),
    ("eval", ["{run}", "--protocol", "classifier"], "is a byol run: it has no classifier"),
    ("eval", ["{run}", "--roles", "ema_0.9"], "role 'ema_0.9' is not in this run"),
    ("transfer", ["{run}", "--datasets", "mnist"], "unknown dataset 'mnist'; valid: digits"),
    ("transfer", ["{run}", "--datasets", "imagefolder={tmp}/none"], "does not exist"),
    ("transfer", ["{run}", "--datasets", "fashion_mnist={tmp}"], "has no train-images"),
    ("export", ["{tmp}"], "no checkpoint under"),
    ("plot", ["{tmp}"], "metrics.jsonl' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], name: str,
                                          args: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    assert load_tool(name).main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
