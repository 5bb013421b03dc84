"""``run.log_with``: Accelerate's experiment trackers hold the numbers of metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import ssl_ema
from ssl_ema.config import ConfigError, load_config
from ssl_ema.engine.launch import train
from ssl_ema.engine.trackers import tracker_values
from tests.helpers import TINY


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_unknown_or_missing_tracker_is_one_line_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"^run.log_with: unknown tracker 'tensorbord'; "
                                          r"valid: aim, .*tensorboard.*wandb"):
        load_config(None, ["run.log_with=[tensorbord]"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["run.log_with=[tensorboard, tensorboard]"])
    missing = next((n for n in ("swanlab", "trackio", "dvclive", "aim") if not installed(n)), None)
    if missing is not None:
        with pytest.raises(ConfigError, match=f"^run.log_with: {missing} is not installed; pip "
                                              f"install {missing}"):
            load_config(None, [f"run.log_with=[{missing}]"])
    assert load_config(None, []).run.log_with == ()
    # One name, as Accelerate's own log_with takes it: a list of one.
    assert load_config(None, ["run.log_with=tensorboard"]).run.log_with == ("tensorboard",)


def test_tracker_values_are_the_records_numbers() -> None:
    record = {"event": "train", "step": 7, "epoch": 1, "loss": -0.5, "lr": 0.1,
              "batch": 64, "flag": True, "signal": "SIGTERM"}
    assert tracker_values(record) == {"train/epoch": 1.0, "train/loss": -0.5, "train/lr": 0.1,
                                      "train/batch": 64.0}
    assert tracker_values({"event": "header", "step": 0, "kappa": 0.5}) == {}


def tiny_run(tmp_path: Path, tracker: str) -> ssl_ema.TrainedRun:
    return ssl_ema.train(None, [*TINY, f"run.output_dir={tmp_path}", "run.name=tracked",
                                "train.log_every=1", f"run.log_with=[{tracker}]"])


def jsonl_numbers(run_dir: Path, event: str, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {r["step"]: r[key] for r in records if r["event"] == event}


@pytest.mark.slow  # trains 3 tiny steps
@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard not installed")
def test_tensorboard_holds_the_jsonl_values(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_run(tmp_path, "tensorboard")
    logs = run.run_dir / "tracked"  # Accelerate: <project_dir = run dir>/<project name>
    events = EventAccumulator(str(logs)).Reload()
    for event, key in [("train", "loss"), ("train", "momentum"), ("eval", "knn_teacher")]:
        written = {s.step: s.value for s in events.Scalars(f"{event}/{key}")}
        expected = jsonl_numbers(run.run_dir, event, key)
        assert written.keys() == expected.keys() and len(expected) >= 2, key
        for step, value in expected.items():  # TensorBoard stores float32
            assert written[step] == pytest.approx(value, rel=1e-6), (key, step)


@pytest.mark.slow
@pytest.mark.skipif(not installed("wandb"), reason="wandb not installed")
def test_wandb_offline_holds_the_jsonl_values(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tiny_run(tmp_path, "wandb")
    offline = list((run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0  # W&B's files under the run


@pytest.mark.slow
@pytest.mark.skipif(not installed("mlflow"), reason="mlflow not installed")
def test_mlflow_holds_the_jsonl_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    # An offline store without a database server; MLflow 3 asks to opt in to its file store.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    run = tiny_run(tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient()
    (found,) = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id,
                                                                  "train/loss")}
    assert history == pytest.approx(jsonl_numbers(run.run_dir, "train", "loss"))


@pytest.mark.slow  # trains 1 + 1 tiny steps
@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard not installed")
def test_an_unwritable_tracker_folder_is_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """TensorBoard cannot create its folder (a file stands there): the run stops with the one
    line naming it, exit 1, and no traceback from the tracker that never started."""
    out, recipe = tmp_path / "runs", tmp_path / "tracked.yaml"
    recipe.write_text("method:\n  name: byol\nrun:\n  log_with: tensorboard\n")
    assert train(str(recipe), [*TINY, f"run.output_dir={out}", "train.max_steps=1"]) == 0
    (run_dir,) = (out / "tracked").iterdir()
    shutil.rmtree(run_dir / "tracked")
    (run_dir / "tracked").write_text("a file where TensorBoard's folder goes")
    capsys.readouterr()
    assert train(None, ["train.max_steps=2"], resume=str(run_dir)) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: could not write {run_dir / 'tracked'}: ")
