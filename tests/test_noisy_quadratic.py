"""The EMA Scaling Rule on a noisy quadratic (tools/noisy_quadratic.py): with lr * kappa and
rho ** kappa every kappa follows the kappa=1 trajectory in samples seen; with rho unchanged the
EMA (and, once the EMA feeds back, the student) does not."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from types import ModuleType

import pytest
import torch

from tests.helpers import ROOT, python


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("noisy_quadratic",
                                                  ROOT / "tools" / "noisy_quadratic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


nq = _load_tool()
SETUP = nq.Setup(replicas=400)  # paired comparison (common noise): few replicas suffice
COUPLINGS = (0.0, 2.0)


@pytest.fixture(scope="module", params=COUPLINGS, ids=lambda c: f"c={c:g}")
def result(request: pytest.FixtureRequest) -> tuple[float, dict]:
    rows, _ = nq.compare(request.param, SETUP, rules=("ema", "optimizer"))
    return request.param, {(r.rule, r.kappa): r for r in rows}


def test_ema_rule_matches_kappa_one(result: tuple[float, dict]) -> None:
    _, rows = result
    devs = []
    for k in nq.KAPPAS:
        r = rows["ema", k]
        assert r.lr == pytest.approx(SETUP.lr * k) and r.momentum == pytest.approx(0.995**k)
        assert r.loss_dev <= nq.TOLERANCE and r.mean_dev <= nq.TOLERANCE, r
        assert r.student_dev <= nq.TOLERANCE, r
        assert max(r.loss_se, r.mean_se) < nq.TOLERANCE / 20  # the tolerance is resolved
        devs.append(r.loss_dev)
    # what is left is the SDE discretisation error: zero at kappa=1, growing with kappa
    assert devs[0] == 0.0 and devs == sorted(devs)


def test_without_ema_rule_kappa_8_and_16_deviate(result: tuple[float, dict]) -> None:
    coupling, rows = result
    for k in (8, 16):
        r = rows["optimizer", k]
        assert r.lr == pytest.approx(SETUP.lr * k) and r.momentum == SETUP.momentum
        assert min(r.loss_dev, r.mean_dev) >= nq.SEPARATION * nq.TOLERANCE, r
        assert r.loss_dev > 10 * rows["ema", k].loss_dev
        assert r.loss_dev > 50 * r.loss_se  # far outside the Monte-Carlo noise
        if coupling == 0.0:  # the student does not see the EMA: only the EMA is off
            assert r.student_dev <= nq.TOLERANCE, r
        else:  # the EMA feeds back: the student is dragged off as well
            assert r.student_dev >= nq.SEPARATION * nq.TOLERANCE, r
    verdict = nq.verdict(list(rows.values()))
    assert verdict["holds"], verdict


def test_residual_is_first_order_in_lr() -> None:
    """Halving lr (same SDE: twice the samples, rho ** 0.5) halves the EMA-rule residual."""
    base = nq.Setup(replicas=200)
    fine = nq.Setup(replicas=200, lr=base.lr / 2, momentum=base.momentum**0.5,
                    samples=2 * base.samples)
    dev = [nq.compare(0.0, s, rules=("ema",), kappas=(1, 16))[0][-1].loss_dev for s in (base, fine)]
    assert 0.4 < dev[1] / dev[0] < 0.6, dev


def test_kappa_one_is_identical_across_rules_and_seeded() -> None:
    setup = nq.Setup(replicas=50, samples=320)
    runs = [nq.simulate(1, r, coupling=1.0, setup=setup) for r in ("ema", "optimizer", "none")]
    for run in runs[1:]:
        assert torch.equal(run.ema, runs[0].ema) and torch.equal(run.student, runs[0].student)
        assert (run.lr, run.momentum) == (setup.lr, setup.momentum)
    other = nq.simulate(1, "ema", coupling=1.0, setup=nq.Setup(replicas=50, samples=320, seed=1))
    assert not torch.equal(other.ema, runs[0].ema)
    assert runs[0].ema.dtype == torch.float64 and runs[0].ema.shape == (21, 50, 2)
    with pytest.raises(ValueError, match="kappa"):
        nq.simulate(3, "ema", setup=setup)
    with pytest.raises(ValueError, match="unknown scaling rule"):
        nq.simulate(2, "sqrt", setup=setup)


@pytest.mark.parametrize("argv", [["--coupling", "-1"], ["--coupling", "nan"],
                                  ["--coupling", "100"], ["--replicas", "1"], ["--replicas", "x"]])
def test_cli_rejects_bad_input(argv: list[str], tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        nq.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_writes_plot_and_json_matching_the_table(tmp_path, tools_env) -> None:
    out = tmp_path / "nq"
    proc = subprocess.run(
        [python(), str(ROOT / "tools" / "noisy_quadratic.py"), "--out", str(out),
         "--coupling", "2", "--replicas", "200", "--seed", "3"],
        env=tools_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "noisy_quadratic.png").stat().st_size > 10_000
    data = json.loads((out / "noisy_quadratic.json").read_text())
    assert data["coupling"] == 2.0 and data["setup"]["replicas"] == 200 and data["claim"]["holds"]
    assert "holds: with the EMA rule" in proc.stdout
    printed = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(ema|optimizer|none)\s+(\d+)\s+\S+\s+\S+\s+(\S+)\s+\S+\s+(\S+)", line)
        if m:
            printed[m[1], int(m[2])] = (float(m[3]), float(m[4]))
    assert len(printed) == len(data["rows"]) == 15
    for row in data["rows"]:
        loss, mean = printed[row["rule"], row["kappa"]]
        assert loss == pytest.approx(row["loss_dev"], abs=6e-5)
        assert mean == pytest.approx(row["mean_dev"], abs=6e-5)
    claim = data["claim"]
    with_rule = max(max(v) for (rule, _), v in printed.items() if rule == "ema")
    assert claim["with_rule"] == pytest.approx(with_rule, abs=6e-5)
    assert claim["with_rule"] <= nq.TOLERANCE
    assert f"max deviation {claim['with_rule']:.4f}" in proc.stdout
    assert f"{claim['without_rule']['16']:.4f} (kappa=16)" in proc.stdout
    assert len(data["curves"]["samples"]) == len(data["curves"]["ema/16"]) == 201


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="needs matplotlib.*--no-plot"):
        nq.plot({"samples": [0.0]}, 0.0, tmp_path / "p.png")
