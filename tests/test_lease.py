"""Lease mode of tools/reproduce.py (issue 24) and its files (issue 25): records written as each
run ends and packed for the lease to return, a SIGKILL at a random moment loses no finished run,
damaged files set aside instead of fatal, no run started that the budget cannot finish, CPU
studies left alone on a GPU, estimates carried between devices by a measured speed ratio."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ssl_ema.reproduce import runner
from ssl_ema.reproduce.devices import REFERENCE_GPU, Speeds, record_rate
from ssl_ema.reproduce.jsonfile import DAMAGED
from ssl_ema.reproduce.lease import PACK, pack
from ssl_ema.reproduce.processes import makespan
from ssl_ema.reproduce.runner import Budget, StudyPlan, estimate_s, plan_study, spend
from ssl_ema.reproduce.store import WALL, Store, add_wall, wall_seconds
from ssl_ema.reproduce.study import Study, StudyVariant
from ssl_ema.reproduce.tool_analyses import quadratic_rule
from tests.helpers import ROOT, load_tool, tiny_study

H200 = "cuda (NVIDIA H200)"


def quadratic(n: int = 3, replicas: int = 20) -> Study:
    """A tool study of ``n`` short runs (seconds each): the noisy quadratic at a few seeds."""
    return Study(name="nq", title="nq", claim="c", paper="p", schedule="s", recipe="",
                 tool="tools/noisy_quadratic.py", device="cpu", minutes_per_run=0.2,
                 variants=tuple(StudyVariant(f"s{i}", ("--replicas", str(replicas), "--seed",
                                                       str(i), "--no-plot"))
                                for i in range(n)),
                 plot_keys=("ema/16",), analysis=quadratic_rule({"s0": "c = 0"}))


def main_with_quadratic(argv: list[str]) -> int:
    """tools/reproduce.py's main over the `quadratic` study alone (a subprocess's entry)."""
    from tests.helpers import load_tool

    return load_tool("reproduce").main(argv, studies=[quadratic()])


def damaged_copy(source: Path, target: Path) -> bytes:
    """A real study record cut off half-way, as a full disk or a killed copy leaves it."""
    data = source.read_bytes()[: source.stat().st_size // 2]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return data


def test_a_truncated_study_record_is_set_aside(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    results = tmp_path / "results"
    cut = damaged_copy(ROOT / "docs" / "results" / "scaling-cpu.json", results / "tiny.json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)  # really damaged
    store = Store(results, "tiny")
    assert store.records == [] and not (results / "tiny.json").exists()
    (aside,) = results.glob(f"tiny.json{DAMAGED}*")
    assert aside.read_bytes() == cut  # kept as it was, for a person to look at
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny.json is damaged" in err[0] and aside.name in err[0]
    # Every later command runs: here the report, which writes a fresh record file.
    from tests.helpers import load_tool

    argv = ["report", "--runs", str(tmp_path / "runs"), "--results", str(results)]
    assert load_tool("reproduce").main(argv, studies=[tiny_study()]) == 0
    assert json.loads((results / "tiny.json").read_text())["runs"] == []
    assert aside.read_bytes() == cut
    # JSON, but not a record file: set aside too, never overwritten
    (results / "tiny.json").write_text("[1, 2]\n")
    assert Store(results, "tiny").records == []
    assert "a JSON list, not an object" in capsys.readouterr().err
    kept = sorted(p.read_bytes() for p in results.glob(f"tiny.json{DAMAGED}*"))
    assert kept == sorted([cut, b"[1, 2]\n"])  # both kept, even within one second


def test_a_truncated_wall_time_is_set_aside(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "header.json").write_text("{}")
    (run / "results.json").write_text("{}")
    os.utime(run / "header.json", (1000.0, 1000.0))
    os.utime(run / "results.json", (1060.0, 1060.0))
    add_wall(run, 12.5)
    add_wall(run, 30.0)
    assert wall_seconds(run) == 42.5
    cut = damaged_copy(run / WALL, run / WALL)
    assert wall_seconds(run) == 60.0  # the span from header to results instead
    assert "reproduce.json is damaged" in capsys.readouterr().err
    (aside,) = run.glob(f"{WALL}{DAMAGED}*")
    assert aside.read_bytes() == cut
    add_wall(run, 5.0)  # booking goes on from a fresh file
    assert wall_seconds(run) == 5.0


def test_a_truncated_tool_result_runs_again(tmp_path: Path) -> None:
    study = quadratic(1)
    home = tmp_path / "runs" / "nq" / "s0" / "seed0"
    home.mkdir(parents=True)
    (home / "result.json").write_text('{"reproduce": {"resolved": {"rep')
    (job,) = plan_study(study, tmp_path / "runs", None).jobs
    assert job.action == "new" and list(home.glob(f"result.json{DAMAGED}*"))


def test_cpu_studies_wait_on_a_gpu_unless_named() -> None:
    p = StudyPlan(quadratic())
    assert "not run on a GPU machine unless named" in p.why_not_here(H200)
    assert p.why_not_here(H200, named=True) == "" and p.why_not_here("cpu") == ""
    gpu = StudyPlan(Study(**{**quadratic().__dict__, "device": "gpu"}))
    assert "no CUDA device" in gpu.why_not_here("cpu") and gpu.why_not_here(H200) == ""


def test_estimates_carry_between_devices_by_the_measured_ratio(tmp_path: Path) -> None:
    study = Study(**{**tiny_study().__dict__, "device": "gpu", "minutes_per_run": 10.0})
    job = plan_study(study, tmp_path / "runs", None).jobs[0]
    store = Store(tmp_path, "tiny")
    unmeasured = Speeds.load(tmp_path)  # the H100's figure only
    assert estimate_s(study, job, store, H200, unmeasured) == (600.0, "stated")
    record_rate(tmp_path, H200, 30000.0, date="2026-12-05")
    speeds = Speeds.load(tmp_path)
    ratio = 21185.0 / 30000.0
    seconds, source = estimate_s(study, job, store, H200, speeds)
    assert seconds == pytest.approx(600.0 * ratio) and "H100 × 0.71" in source
    assert estimate_s(study, job, store, REFERENCE_GPU, speeds) == (600.0, "stated")
    # A run measured on the H100 carries to the H200 by the same ratio, and back.
    store.records = [{"variant": "a", "seed": 0, "device": REFERENCE_GPU, "wall_s": 500.0}]
    seconds, source = estimate_s(study, job, store, H200, speeds)
    assert seconds == pytest.approx(500.0 * ratio) and source.startswith("measured on NVIDIA H100")
    store.records[0]["device"] = H200
    assert estimate_s(study, job, store, REFERENCE_GPU, speeds)[0] == pytest.approx(500.0 / ratio)
    assert estimate_s(study, job, store, H200, speeds) == (500.0, "measured")
    # Saved beside the records, with the H100's anchor.
    devices = json.loads((tmp_path / "devices.json").read_text())["devices"]
    assert devices[H200]["images_per_s"] == 30000.0 and REFERENCE_GPU in devices


def test_no_run_starts_that_the_budget_cannot_finish(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(runner, "run_process", lambda cmd, *a: started.append(cmd) or 1)
    study = quadratic(2)  # stated 0.2 min = 12 s a run
    plans = [plan_study(study, tmp_path / "runs", None)]
    stores = {"nq": Store(tmp_path, "nq")}
    lines: list[str] = []
    spend(plans, stores, Budget.of(10.0), "cpu", log=lines.append, clock=lambda: 0.0)
    assert started == [] and "longer than the whole budget" in lines[0]
    spend(plans, stores, Budget.of(10.0, slices=True), "cpu", log=lines.append,
          clock=lambda: 0.0)
    assert len(started) == 2  # asked for: slices of runs longer than the budget
    started.clear()
    clock = iter([0.0, 0.0, 0.0, 9.0, 9.0]).__next__  # start; run 1 at 0, took 9 s; run 2
    spend(plans, stores, Budget.of(20.0), "cpu", log=lines.append, clock=clock)
    assert len(started) == 1  # the second would need 12 s of the 11 - 3 left: not started
    assert "needs ~0.2 min, 0.1 min left" in lines[-1]


def test_pack_holds_records_and_run_files(tmp_path: Path) -> None:
    results, runs, out = tmp_path / "docs" / "results", tmp_path / "runs", tmp_path / "out"
    record_rate(results, H200, 1.0)
    (results / "REPORT.md").write_text("# report\n")
    run = runs / "nq" / "s0" / "seed0" / "20261205-000000"
    run.mkdir(parents=True)
    for name in ("header.json", "results.json", "config.yaml", "metrics.jsonl"):
        (run / name).write_text("{}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "model.safetensors").write_bytes(b"0" * 1000)
    path = pack(out, tmp_path, results, runs)
    assert [p.name for p in out.iterdir()] == [PACK]  # nothing else: no temporary left
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
    assert {"docs/results/devices.json", "docs/results/REPORT.md",
            "runs/nq/s0/seed0/20261205-000000/metrics.jsonl"} <= names
    assert not any("checkpoints" in n for n in names)


def stored_records(out: Path) -> list[dict]:
    """The records in the lease's tarball (it must open and parse whenever it exists)."""
    if not (out / PACK).exists():
        return []
    with tarfile.open(out / PACK) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("results/nq.json")), None)
        if member is None:
            return []
        return json.loads(tar.extractfile(member).read())["runs"]  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_sigkill_at_a_random_moment_loses_no_finished_run(tmp_path: Path,
                                                            tools_env: dict[str, str]) -> None:
    """A real `reproduce.py run --out DIR` (3 tool runs, real processes), killed with SIGKILL
    (the whole process group) at a random moment: every run it reported stored is in DIR's
    tarball, which opens; the next `run` stores the rest."""
    out, results = tmp_path / "out", tmp_path / "results"
    argv = ["run", "--budget", "5m", "--out", str(out), "--results", str(results),
            "--runs", str(tmp_path / "runs"), "nq"]
    cmd = [sys.executable, "-c", "import sys; from tests.test_lease import main_with_quadratic; "
           "sys.exit(main_with_quadratic(sys.argv[1:]))", *argv]
    log = tmp_path / "log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=tools_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        # A random moment after the first run was stored (a run takes ~3-10 s here), so
        # that the kill lands anywhere in what follows: packing, a run, storing the next.
        start = time.monotonic()
        while "   stored" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() - start < 240, log.read_text()
            time.sleep(0.05)
        moment = random.uniform(0.0, 8.0)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    announced = text.count("   stored")
    records = stored_records(out)
    assert announced >= 1 and len(records) >= announced, (moment, text)
    for r in records:
        assert r["variant"] in {"s0", "s1", "s2"} and r["metrics"], (moment, r)
    if (results / "nq.json").exists():  # the record file itself: whole, never half-written
        json.loads((results / "nq.json").read_text())
    # The next run (not killed) stores the rest; a run that finished unstored is collected.
    done = subprocess.run(cmd, cwd=ROOT, env=tools_env, capture_output=True, text=True,
                          timeout=900)  # two runs of seconds each idle; a minute each at load 12
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(r["variant"] for r in stored_records(out)) == ["s0", "s1", "s2"]
    assert not list(out.glob(".*tmp*")) or proc.returncode == -signal.SIGKILL
    print(f"killed {moment:.2f} s after the first store, with {announced} runs stored")


def test_runs_are_placed_in_the_leases_that_can_finish_them(tmp_path: Path) -> None:
    """`reproduce.py list --leases`: in priority order, a run only in a lease whose rest can
    finish it (the first lease's smaller, after the smoke check); longer than any command: none;
    carried to the H200 by its measured speed once the smoke check has stored one."""
    from ssl_ema.reproduce.lease import COMMAND_S, SETUP_S, SMOKE_S, schedule

    minutes = {"k1": 2.5, "k8": 2.5, "k8_rule": 2.5, "long": 10.5, "k4": 4.0}
    study = Study(name="g", title="g", claim="c", paper="p", schedule="s",
                  recipe="recipes/scaling_digits.yaml", device="gpu",
                  variants=tuple(StudyVariant(n, minutes=m) for n, m in minutes.items()),
                  plot_keys=("knn",), analysis=tiny_study().analysis)
    plans = [plan_study(study, tmp_path / "runs", None)]
    results = tmp_path / "results"
    leases, never = schedule(plans, H200, Speeds.load(results), results)
    # lease 1: 330 s less the 45 s reserve fits one 150 s run; then 485 s: three runs (k4 240 s)
    assert COMMAND_S - SETUP_S - SMOKE_S == 330.0
    assert [[n.split()[1] for n, _ in lease] for lease in leases] == [["k1"], ["k8", "k8_rule"],
                                                                      ["k4"]]
    assert [n.split()[1] for n, _ in never] == ["long"]  # 630 s > 485 s of any one command
    record_rate(results, H200, 1.5 * 21185.0)  # an H200 measured 1.5 times the H100's speed
    leases, never = schedule(plans, H200, Speeds.load(results), results)
    assert never == [] and leases[0][0] == ("g k1 seed 0", pytest.approx(100.0))
    assert [[n.split()[1] for n, _ in lease] for lease in leases] == [["k1", "k8"],
                                                                      ["k8_rule", "k4"], ["long"]]


@pytest.mark.slow
def test_runs_at_once_each_stored_as_it_ends(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs 2: three real tool runs, two at a time; each stored as it ends, the third
    started when a slot frees, the records written by the one thread that spends."""
    spans: dict[str, list[float]] = {}
    real = runner.run_process

    def timed(cmd: list[str], env: dict[str, str], *a: float) -> int:
        seed = cmd[cmd.index("--seed") + 1]
        assert env["SSL_EMA_CPU_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
        spans[seed] = [time.monotonic()]
        code = real(cmd, env, *a)
        spans[seed].append(time.monotonic())
        return code

    monkeypatch.setattr(runner, "run_process", timed)
    plans = [plan_study(quadratic(3), tmp_path / "runs", None)]
    store, lines, saved = Store(tmp_path, "nq"), [], []
    spend(plans, {"nq": store}, Budget.of(600.0), "cpu", log=lines.append,
          stored=lambda p: saved.append(len(store.records)), jobs=2)
    assert sorted(r["variant"] for r in store.records) == ["s0", "s1", "s2"]
    assert saved == [1, 2, 3]  # one store call per run, as each ended
    (a0, a1), (b0, b1), (c0, _) = spans["0"], spans["1"], spans["2"]
    assert b0 < a1 and a0 < b1  # the first two overlapped
    assert c0 >= min(a1, b1)  # the third waited for a free slot
    assert sum("finished in" in line for line in lines) == 3


def test_list_says_the_wall_time_with_runs_at_once(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert makespan([10.0, 10.0, 10.0], 2) == 20.0
    assert makespan([30.0, 10.0, 10.0, 10.0], 2) == 30.0  # the short ones share a slot
    assert makespan([30.0, 10.0, 10.0, 10.0], 1) == 60.0
    argv = ["list", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path)]
    reproduce = load_tool("reproduce")
    assert reproduce.main([*argv, "--jobs", "2"], studies=[quadratic(3)]) == 0
    assert "3 pending; ~0.6 min of runs left, ~0.4 min with 2 at once" in capsys.readouterr().out
    assert reproduce.main([*argv, "--jobs", "1"], studies=[quadratic(3)]) == 0
    assert "at once" not in capsys.readouterr().out


def main_with_long_tiny(argv: list[str]) -> int:
    """tools/reproduce.py's main over a tiny study of two seeds long enough to interrupt."""
    study = replace(tiny_study("train.epochs=2000", "eval.every_epochs=0"), seeds=(0, 1))
    return load_tool("reproduce").main(argv, studies=[study])


@pytest.mark.slow
@pytest.mark.parametrize(("target", "jobs"), [("group", 2), ("runner", 2), ("runner", 1)])
def test_ctrl_c_stops_the_runs_with_a_checkpoint_and_one_line(
        tmp_path: Path, tools_env: dict[str, str], target: str, jobs: int) -> None:
    """A real SIGINT to `reproduce.py run` while its runs train: to the process group (Ctrl-C
    in a terminal) or to the runner alone (which passes it on); with runs at once or one at a
    time. Every run in progress stops with a checkpoint, the runner says so in one line and
    exits 130, and the next `run` resumes them."""
    runs = tmp_path / "runs"
    argv = ["run", "--budget", "30m", "--jobs", str(jobs), "--results", str(tmp_path / "res"),
            "--runs", str(runs)]
    cmd = [sys.executable, "-c", "import sys; from tests.test_lease import main_with_long_tiny; "
           "sys.exit(main_with_long_tiny(sys.argv[1:]))", *argv]
    with (tmp_path / "out").open("w") as o, (tmp_path / "err").open("w") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=tools_env, stdout=o, stderr=e,
                                start_new_session=True)
        try:
            start = time.monotonic()
            while len([m for m in runs.glob("tiny/a/seed*/*/metrics.jsonl")
                       if m.stat().st_size]) < jobs:
                assert proc.poll() is None and time.monotonic() - start < 600
                time.sleep(0.1)
            time.sleep(1.0)  # every run in training
            if target == "group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGINT)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("interrupted: the runs in progress stopped")
    assert out.count("   interrupted after") == jobs, out
    stopped = sorted(runs.glob("tiny/a/seed*/*/checkpoints/step_*"))
    assert len(stopped) == jobs, out
    plans = [plan_study(replace(tiny_study("train.epochs=2000", "eval.every_epochs=0"),
                                seeds=(0, 1)), runs, None)]
    assert [j.action for j in plans[0].jobs][:jobs] == ["resume"] * jobs


@pytest.mark.parametrize("timed", [False, True])
def test_a_timed_study_runs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  timed: bool) -> None:
    """--jobs 2 over a study and a benchmark study: the benchmark's runs share the cores with
    no other run (not even the other study's last one), and get no thread share of their own."""
    spans: list[tuple[str, float, float, str]] = []
    # As from a user's shell: the thread count comes from the scheduler, not from the xdist
    # worker's setting (conftest.py), which would otherwise reach every run.
    monkeypatch.delenv("SSL_EMA_CPU_THREADS", raising=False)

    def sleeper(cmd: list[str], env: dict[str, str], *a: float) -> int:
        t0 = time.monotonic()
        time.sleep(0.3)
        spans.append((cmd[cmd.index("--seed") + 1], t0, time.monotonic(),
                      env.get("SSL_EMA_CPU_THREADS", "")))
        return 1  # not finished: nothing is stored, the spans are what is checked

    monkeypatch.setattr(runner, "run_process", sleeper)
    bench = replace(quadratic(2), name="bench", timed=timed,
                    variants=tuple(StudyVariant(f"b{i}", ("--replicas", "20", "--seed",
                                                          str(10 + i), "--no-plot"))
                                   for i in range(2)))
    plans = [plan_study(s, tmp_path / s.name, None) for s in (quadratic(3), bench)]
    stores = {"nq": Store(tmp_path, "nq"), "bench": Store(tmp_path, "bench")}
    spend(plans, stores, Budget.of(600.0), "cpu", log=lambda _: None, jobs=2)
    bench_spans = [s for s in spans if int(s[0]) >= 10]
    others = [s for s in spans if int(s[0]) < 10]
    overlaps = sum(1 for b in bench_spans for o in spans
                   if o is not b and o[1] < b[2] and b[1] < o[2])
    assert len(bench_spans) == 2 and len(others) == 3
    assert (overlaps == 0) == timed  # untimed: the scheduler packs them two at a time
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert {b[3] for b in bench_spans} == ({""} if timed else {share})
