"""tools/sweep.py: variants of a recipe trained in their own processes, reused and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ssl_ema.config import ConfigError
from ssl_ema.engine.sweep import Variant, parse_variant, plan
from tests.helpers import ROOT, TINY, load_tool

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

RECIPE = str(ROOT / "recipes" / "quickstart.yaml")


def rows(out: Path) -> dict[str, dict]:
    return {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}


def test_sweep_trains_each_variant_then_reuses_and_resumes(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    sweep, out = load_tool("sweep"), tmp_path / "sweep"
    argv = [RECIPE, *TINY, "--variant", "base", "--variant", "fast", "optim.lr=0.2",
            "--out", str(out)]
    assert sweep.main(argv) == 0
    first = rows(out)
    for name, lr in (("base", 0.05), ("fast", 0.2)):  # TINY sets 0.05 for every variant
        run = Path(first[name]["run_dir"])
        assert run.parent == out / name / "seed0" and first[name]["status"] == "trained"
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == lr
        results = json.loads((run / "results.json").read_text())
        assert results["step"] == 3
        assert first[name]["metrics"] == {k: results[k] for k in
                                          ("knn_random", "knn_teacher", "knn_student",
                                           "knn_random_bn", "best_knn_teacher",
                                           "best_knn_student", "best_knn_teacher_epoch",
                                           "best_knn_student_epoch")}
    table = capsys.readouterr().out.splitlines()
    fast = next(line for line in table if line.startswith("fast ") and "trained" in line)
    assert f"{first['fast']['metrics']['knn_teacher']:.4f}" in fast

    # Cut the second run before its final evaluation: the same command reuses the first and
    # resumes the second from its checkpoint, which reproduces its numbers exactly.
    (Path(first["fast"]["run_dir"]) / "results.json").unlink()
    assert sweep.main(argv) == 0
    second = rows(out)
    assert second["base"]["status"] == "reused" and second["fast"]["status"] == "resumed"
    assert {n: r["run_dir"] for n, r in second.items()} == {n: r["run_dir"]
                                                           for n, r in first.items()}
    assert second["fast"]["metrics"] == first["fast"]["metrics"]
    assert second["base"]["wall_s"] == first["base"]["wall_s"]  # kept from the first sweep
    assert len(list((out / "base" / "seed0").iterdir())) == 1

    # A run that trains differently (here: longer) is never taken for a finished one.
    jobs = plan(RECIPE, [*TINY, "train.max_steps=4"], [Variant("base", ())], [0], out)
    assert [(j.action, j.run_dir) for j in jobs] == [("new", None)]
    jobs = plan(RECIPE, [*TINY, "data.num_workers=1"], [Variant("base", ())], [0], out)
    assert jobs[0].action == "reuse"  # bookkeeping keys may differ


def test_bad_variants_fail_before_anything_trains(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    sweep, out = load_tool("sweep"), tmp_path / "sweep"
    assert sweep.main([RECIPE, "--variant", "a", "--variant", "b", "optim.lr=fast",
                       "--out", str(out)]) == 2
    assert "variant 'b': optim.lr" in capsys.readouterr().err
    assert sweep.main([RECIPE, "--variant", "a", "--variant", "a", "--out", str(out)]) == 2
    assert "'a' is used twice" in capsys.readouterr().err
    assert sweep.main([RECIPE, "--out", str(out)]) == 2
    assert not out.exists()
    train = load_tool("sweep").train_command
    job = plan(RECIPE, [], [Variant("a", ("optim.lr=0.1",))], [3], out)[0]
    cmd = train("accelerate launch --num_processes 2", RECIPE, job)
    assert cmd[:4] == ["accelerate", "launch", "--num_processes", "2"]
    assert cmd[4].endswith("tools/train.py") and cmd[5] == RECIPE
    assert cmd[6:] == ["optim.lr=0.1", "run.seed=3", f"run.output_dir={out / 'a'}",
                       "run.name=seed3"]
    with pytest.raises(ConfigError, match="not a key=value"):
        parse_variant(["torch_init", "model.init"])
    with pytest.raises(ConfigError, match="not a variant name"):
        parse_variant(["model.init=torch"])
