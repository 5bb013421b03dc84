"""Tool studies of tools/reproduce.py (noisy quadratic, benchmarks): planned by resolved
arguments, run, stored, reused, invalidated; their analyses on fixed inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_ema.reproduce import runner
from ssl_ema.reproduce.runner import Budget, plan_study, spend, status
from ssl_ema.reproduce.store import Store
from ssl_ema.reproduce.study import FAILS, HOLDS, TOO_FEW, Study, StudyVariant
from ssl_ema.reproduce.tool_analyses import quadratic_rule, throughput
from ssl_ema.reproduce.tool_runs import load_tool, thinned_curve

QUADRATIC = "tools/noisy_quadratic.py"


def quadratic_study(replicas: int) -> Study:
    return Study(name="nq", title="nq", claim="c", paper="p", schedule="s", recipe="",
                 tool=QUADRATIC, device="cpu", minutes_per_run=0.5,  # seconds, in fact
                 variants=(StudyVariant("c0", ("--replicas", str(replicas), "--no-plot")),),
                 plot_keys=("ema/16",), analysis=quadratic_rule({"c0": "c = 0"}))


def in_process(cmd: list[str], env: dict[str, str], timeout_s: float,
               grace_s: float = 0.0) -> int:
    """runner.run_process without a new interpreter: the tool's main on the same argv."""
    return load_tool(Path(cmd[1])).main(cmd[2:])


@pytest.mark.slow
def test_tool_study_runs_stores_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_process", in_process)
    monkeypatch.chdir(tmp_path)  # the tool's own --out folder lands here
    runs, store = tmp_path / "runs", Store(tmp_path / "results", "nq")
    study = quadratic_study(16)
    (job,) = plan_study(study, runs, None).jobs
    assert status(job, store) == ("pending", 0.0)
    assert job.resolved["setup"]["replicas"] == 16 and job.resolved["coupling"] == 0.0
    spend([plan_study(study, runs, None)], {"nq": store}, Budget.of(600.0), "cpu")
    (rec,) = store.records
    assert rec["config"] == job.resolved and rec["device"].startswith("cpu (")
    assert rec["metrics"]["claim/with_rule"] <= 0.03 and rec["wall_s"] > 0
    assert rec["curve"][-1]["samples_seen"] == 3200 and "ema/16" in rec["metrics"]
    assert len(rec["curve"]) <= 52 and "curves" not in rec["result"]
    # planned again: the finished run is found (the store, and its result in the runs folder)
    (again,) = plan_study(study, runs, None).jobs
    assert again.action == "reuse" and status(again, Store(tmp_path / "none", "nq"))[0] == "done"
    # another resolved argument is another run: the record no longer counts
    (other,) = plan_study(quadratic_study(32), runs, None).jobs
    assert other.action == "new" and store.find(other) is None and store.current([other]) == []


def test_bad_tool_arguments_block_the_study(tmp_path: Path) -> None:
    bad = Study(name="nq", title="t", claim="c", paper="p", schedule="s", recipe="",
                tool=QUADRATIC, variants=(StudyVariant("x", ("--coupling", "lots")),))
    assert "arguments rejected" in plan_study(bad, tmp_path, None).blocked
    gone = Study(name="nq", title="t", claim="c", paper="p", schedule="s", recipe="",
                 tool="tools/nope.py", variants=(StudyVariant("x"),))
    assert plan_study(gone, tmp_path, None).blocked == "tool missing: tools/nope.py"


def test_thinned_curve_keeps_the_ends() -> None:
    curves = {"samples": list(range(201)), "ema/1": [float(i) for i in range(201)]}
    points = thinned_curve(curves)
    assert points[0] == {"samples_seen": 0, "ema/1": 0.0} and points[-1]["samples_seen"] == 200
    assert len(points) == 51


def quadratic_record(with_rule: float, without: float) -> dict:
    rows = [{"rule": rule, "kappa": k, "lr": 0.002 * k, "momentum": 0.995 ** k,
             "loss_dev": 0.0 if k == 1 else dev * k / 16, "mean_dev": 0.0}
            for rule, dev in (("ema", with_rule), ("optimizer", without)) for k in (1, 8, 16)]
    return {"variant": "c0", "seed": 0, "result": {"rows": rows},
            "config": {"tolerance": 0.03, "separation": 5.0}}


def test_quadratic_verdicts_on_fixed_inputs() -> None:
    analyse, study = quadratic_rule({"c0": "c = 0"}), quadratic_study(16)
    result = analyse(study, [quadratic_record(0.014, 0.62)])
    assert result.verdict == HOLDS and "0.0140" in result.summary
    assert "| c = 0 | 16 | 0.032 | 0.9229 | 0.0140 | 0.6200 |  |" in result.table
    assert analyse(study, [quadratic_record(0.04, 0.62)]).verdict == FAILS  # rule off by 4%
    # without the rule at kappa = 8: 0.62 * 8/16 = 0.31 >= 0.15; 0.25 * 8/16 < 0.15
    assert analyse(study, [quadratic_record(0.014, 0.25)]).verdict == FAILS
    assert analyse(study, []).verdict == TOO_FEW


def ema_record(ours_k5: float) -> dict:
    def rows(k: int, ours: float) -> list[dict]:
        ms = {"ssl_ema.EMA": ours, "flat lerp_ (reference)": ours * 0.9,
              "lightly.update_momentum": 2.0 * k, "timm ModelEmaV3": 1.5 * k,
              "torch AveragedModel (ema)": 1.6 * k, "ema_pytorch.EMA": None}
        return [{"implementation": i, "k": k, "ms": v} for i, v in ms.items()]

    return {"variant": "ema", "seed": 0, "device": "cuda (H100)",
            "result": {"results": [{"model": "resnet18", "rows": rows(1, 1.0) +
                                    rows(5, ours_k5)}]}}


def test_throughput_verdicts_on_fixed_inputs() -> None:
    study = quadratic_study(16)
    ema = throughput(ema="ema")
    fast = ema(study, [ema_record(5.0)])  # timm, the fastest peer, takes 7.5 ms at K = 5
    assert fast.verdict == HOLDS and "1.50× the fastest peer at worst" in fast.summary
    assert "| resnet18 | 5 | **5** | 4.5 | 10 | 7.5 | 8 | 1.50× |" in fast.table
    assert ema(study, [ema_record(8.0)]).verdict == FAILS  # slower than timm at K = 5
    both = throughput(ema="ema", train="byol")
    train = {"variant": "byol", "seed": 0, "device": "cuda (H100)",
             "metrics": {"ours": 21185.0, "loader_and_step": 4751.0, "compute_bound": 23616.0}}
    assert both(study, [ema_record(5.0), train]).verdict == HOLDS  # 4.46x and 0.90x
    train["metrics"]["loader_and_step"] = 6000.0  # 3.5x the loader: short of 4x
    assert both(study, [ema_record(5.0), train]).verdict == FAILS
    assert both(study, [ema_record(5.0)]).verdict == TOO_FEW


def posthoc_record(tracked: dict[str, tuple[float, float]],
                   posthoc: dict[str, tuple[float, float]]) -> dict:
    """A stored tools/posthoc_ema.py record: role -> (val, test) accuracy, BN recomputed."""
    results = {}
    for role, (val, test) in {**tracked, **{f"posthoc_{s}": v for s, v in posthoc.items()}}.items():
        results[role + "+bn"] = {"val_accuracy": val, "accuracy": test, "ece_15": 0.05,
                                 "nll": 0.3}
        results[role] = {"val_accuracy": val - 0.1, "accuracy": test - 0.1}
    errors = {s: {"profile_error": 0.0 if s in ("0.05", "0.1") else 0.02} for s in posthoc}
    return {"variant": "digits", "seed": 0, "result": {"results": results, "posthoc": errors}}


def test_posthoc_sweep_verdicts_on_fixed_inputs() -> None:
    from ssl_ema.reproduce.laptop import POSTHOC_CPU

    analyse = POSTHOC_CPU.analysis
    assert analyse is not None
    assert analyse(POSTHOC_CPU, []).verdict == TOO_FEW
    tracked = {"teacher": (0.90, 0.91), "student": (0.85, 0.86), "ema_0.5": (0.88, 0.89)}
    # Post-hoc chosen on validation (0.05: val 0.92) scores 0.905 on test: 0.5 points under
    # the tracked choice (teacher, val 0.90, test 0.91): within 1 point, holds.
    sweep = {"0.02": (0.89, 0.95), "0.05": (0.92, 0.905), "0.2": (0.80, 0.81)}
    result = analyse(POSTHOC_CPU, [posthoc_record(tracked, sweep)])
    assert result.verdict == HOLDS
    assert "choice posthoc_0.05: test 90.5% against the tracked choice teacher: 91.0% (-0.5 " \
        "points" in result.summary
    assert "σ_rel = 0.05, inside the sweep 0.02 … 0.2" in result.summary
    assert "| posthoc_0.02 (profile error 0.020) | 89.0 | 95.0 | 0.050 | 0.300 |" in result.table
    assert "| student | 85.0 | 86.0 | 0.050 | 0.300 |" in result.table
    # The test-best 0.02 is not chosen (validation decides); 2 points under fails; an optimum at
    # the end of the sweep is named as such.
    worse = {"0.02": (0.93, 0.89), "0.05": (0.92, 0.95)}
    result = analyse(POSTHOC_CPU, [posthoc_record(tracked, worse)])
    assert result.verdict == FAILS and "-2.0 points" in result.summary
    assert "an end of the sweep" in result.summary
    # Tied on validation: the tied models' mean test accuracy is compared.
    tied = {"0.02": (0.92, 0.90), "0.05": (0.92, 0.94), "0.1": (0.91, 0.99)}
    result = analyse(POSTHOC_CPU, [posthoc_record(tracked, tied)])
    assert result.verdict == HOLDS and "(+1.0 points" in result.summary
    assert "posthoc_0.02, posthoc_0.05 (tied on validation at 92.0%, test averaged)" \
        in result.summary


def test_a_training_tool_run_keeps_its_identity_across_config_layouts() -> None:
    """A stored run of a tool that trains first (tools/posthoc_ema.py --train) still matches
    after the config's layout changed (another method's section left out, BYOL's heads moved
    to byol:), and stops matching when a value that decides the result changes."""
    import copy

    from ssl_ema.config import load_config, to_dict
    from ssl_ema.reproduce.tool_runs import same_identity

    now = {"sigma_rel": [0.05], "train": to_dict(load_config(None, ["method.name=byol"]))}
    older = copy.deepcopy(now)
    older["train"]["dino"] = {"out_dim": 65536}  # every method's section, as runs once wrote
    older["train"]["method"]["projection_dim"] = older["train"]["byol"].pop("projection_dim")
    assert same_identity(older, now)
    older["train"]["optim"]["lr"] = 9.0
    assert not same_identity(older, now)
    assert not same_identity({**now, "sigma_rel": [0.1]}, now)
    assert same_identity({"run": "r", "set": []}, {"run": "r", "set": []})
