"""tools/plot.py's figures on synthetic metrics: a colour per run in every panel, the floor as a
line, teacher / student / EMA copies told apart; the EMA Scaling Rule figure of a study."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import pytest

from ssl_ema.eval.curves import draw_training_curves
from ssl_ema.reproduce.scaling_figure import draw_scaling_figure, kappa_label
from tests.helpers import load_tool

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def close_figures() -> Any:
    yield
    plt.close("all")


def _tool() -> ModuleType:
    return load_tool("plot")


def records(floor: float, shift: float) -> list[dict[str, Any]]:
    """A run's metrics.jsonl: 3 logged steps, evaluations before (with the floor) and after."""
    out: list[dict[str, Any]] = [{"event": "header"}]
    out.append({"event": "eval", "step": 0, "samples_seen": 0, "knn_teacher": 0.3,
                "knn_student": 0.3, "knn_ema_0.9": 0.3, "knn_ema_0.99": 0.3,
                "knn_random_bn": floor})
    for step in (1, 2, 3):
        out.append({"event": "train", "step": step, "samples_seen": 16 * step,
                    "loss": 1.0 / step + shift, "lr": 0.1, "momentum_base": 0.99,
                    "momentum": 0.99 ** 2})
    out.append({"event": "eval", "step": 3, "samples_seen": 48, "knn_teacher": 0.6 + shift,
                "knn_student": 0.5 + shift, "knn_ema_0.9": 0.55, "knn_ema_0.99": 0.45})
    return out


def test_a_run_keeps_its_colour_and_the_floor_is_a_line() -> None:
    fig = draw_training_curves({"a": records(0.42, 0.0), "b": records(0.37, 0.1)})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "learning rate", "teacher momentum", "kNN top-1"]  # no empty panel
    colours: dict[str, set[str]] = {"a": set(), "b": set()}
    for ax in fig.axes:
        for line in ax.lines:
            colours[line.get_label().split(" ")[0]].add(matplotlib.colors.to_hex(line.get_color()))
    assert len(colours["a"]) == len(colours["b"]) == 1 and colours["a"] != colours["b"]

    knn = {line.get_label(): line for line in fig.axes[3].lines}
    assert set(knn) == {f"{r} {s}" for r in "ab" for s in
                        ("teacher", "student", "ema_0.9", "ema_0.99",
                         "floor (random, BN recomputed)")}
    floor = knn["a floor (random, BN recomputed)"]
    # a horizontal line across the panel (axes coordinates 0 to 1), at the floor's value
    assert list(floor.get_xdata()) == [0, 1] and list(floor.get_ydata()) == [0.42, 0.42]
    assert list(knn["b floor (random, BN recomputed)"].get_ydata()) == [0.37, 0.37]
    styles = {s: (knn[f"a {s}"].get_linestyle(), knn[f"a {s}"].get_marker())
              for s in ("teacher", "student", "ema_0.9", "ema_0.99")}
    assert len(set(styles.values())) == 4  # teacher, student and each EMA look different
    assert styles["teacher"][0] == "-" and styles["student"][0] == "--"
    assert list(knn["b teacher"].get_ydata()) == [0.3, pytest.approx(0.7)]


def study(rule_gap: float) -> dict[str, Any]:
    """A study file as tools/reproduce.py stores it: 3 variants × 2 seeds."""
    def run(variant: str, seed: int, batch: int, rule: str, lag: float) -> dict[str, Any]:
        curve = [{"samples_seen": s, "acc_teacher_test": min(1.0, s / 100 - lag),
                  "acc_student_test": s / 100} for s in (0, 50, 100)]
        return {"variant": variant, "seed": seed, "curve": curve,
                "config": {"train": {"batch_size": batch, "batch_schedule": []},
                           "scaling": {"reference_batch": 16, "rule": rule}}}
    runs = [run(v, s, b, r, lag) for s in (0, 1) for v, b, r, lag in
            (("k1", 16, "ema", 0.0), ("k4_ema", 64, "ema", 0.0),
             ("k4_optimizer", 64, "optimizer", rule_gap))]
    return {"study": "toy", "runs": runs}


def test_the_scaling_figure_has_a_colour_per_kappa_and_a_style_per_rule(tmp_path: Path) -> None:
    fig = draw_scaling_figure(study(0.3))
    teacher = {line.get_label(): line for line in fig.axes[0].lines
               if not line.get_label().startswith("_")}
    assert set(teacher) == {"κ = 1, rule ema (2 seeds)", "κ = 4, rule ema (2 seeds)",
                            "κ = 4, rule optimizer (2 seeds)"}
    k4, k4_off = teacher["κ = 4, rule ema (2 seeds)"], teacher["κ = 4, rule optimizer (2 seeds)"]
    assert k4.get_color() == k4_off.get_color() != teacher["κ = 1, rule ema (2 seeds)"].get_color()
    assert (k4.get_linestyle(), k4_off.get_linestyle()) == ("-", "--")
    assert list(k4_off.get_ydata()) == pytest.approx([-0.3, 0.2, 0.7])  # the seed mean
    assert fig.axes[0].get_title() == "teacher (EMA): acc_teacher_test"

    path = tmp_path / "toy.json"
    path.write_text(json.dumps(study(0.3)))
    assert _tool().main(["--study", str(path)]) == 0
    assert (tmp_path / "toy-scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_kappa_labels_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"train": {"batch_size": 256, "batch_schedule": [[15, 2048]]},
              "scaling": {"reference_batch": 256}}
    assert kappa_label(config) == "κ = 1→8"
    tool = _tool()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"study": "empty", "runs": []}))
    for argv, message in ((["--study", str(empty)], "has no stored runs with curves yet"),
                          (["--study", str(tmp_path / "no.json")], "does not exist"),
                          ([], "pass run directories or --study NAME")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
