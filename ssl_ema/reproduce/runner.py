"""Plan a study's runs, say where each stands and what it will cost, and spend a budget on them.

Jobs come from the sweep machinery (``plan``: reuse / resume / new, by resolved config). A job is
*done* when its record is stored or its run has finished, *partial* when its run has a
checkpoint, otherwise *pending*. Estimates are measured where they can be (stored wall times of
the study's runs on this kind of device, per variant first), else the study's stated figure.

Estimates are measured where they can be: stored wall times of the study's runs on this kind of
device (per variant first); else on another device, carried by the measured speed ratio of the
two (`devices`); else the study's stated figure (on the H100 for a GPU study, carried the same
way when this device's speed is measured).

``spend`` starts pending jobs in priority order while the remaining budget can finish them, each
with a ``--stop-after`` deadline before the budget's end so it checkpoints and exits cleanly, and
stores each finished run at once (``stored``: written to disk, and in lease mode packed for the
lease to return) so that a kill at any moment loses no finished run. A job longer than the
whole budget is started only where slices are asked for (``Budget.slices``): its checkpoint
must survive until the next budget, which a GPU lease's does not. A tool study's jobs
(``tool_runs.py``) are planned by their resolved arguments and run whole. Up to ``jobs`` run at
once (``processes.Slots``); each is admitted when a slot frees, and its record written here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ssl_ema.config import ConfigError
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.sweep import Job, Variant, finished_run, locate, plan, train_command
from ssl_ema.reproduce.devices import REFERENCE_GPU, Speeds, device_kind, short
from ssl_ema.reproduce.processes import GRACE_S, INTERRUPTED, Slots, run_process
from ssl_ema.reproduce.store import IDENTITY_IGNORES, Store, add_wall, record
from ssl_ema.reproduce.study import Study
from ssl_ema.reproduce.tool_runs import (
    ToolJob,
    after_tool,
    plan_tool,
    tool_command,
    tool_record,
)

ROOT = Path(__file__).resolve().parents[2]  # the checkout: recipes/, tools/
NO_DATA = "$SSL_EMA_DATA"  # stands in for a data root not given


@dataclass
class StudyPlan:
    """A study's jobs as planned now, or why it cannot be planned (recipe missing, no data)."""

    study: Study
    jobs: list[Job | ToolJob] = field(default_factory=list)
    blocked: str = ""
    no_data: bool = False  # planned, but cannot run without --data

    def why_not_here(self, device: str, named: bool = False) -> str:
        """Why `run` skips this study on ``device`` ("" if it can run); ``named``: the user
        asked for it by name (a CPU study then runs on a GPU machine too)."""
        if self.blocked:
            return self.blocked
        if self.no_data:
            return "needs the data root (--data DIR or SSL_EMA_DATA)"
        if self.study.device == "gpu" and device_kind(device) == "cpu":
            return "a GPU study: no CUDA device here"
        if self.study.device == "cpu" and device_kind(device) != "cpu" and not named:
            return "a CPU study: not run on a GPU machine unless named"
        return ""


def plan_study(study: Study, runs_root: Path, data_root: str | None) -> StudyPlan:
    """The study's jobs, seed-major (every variant of seed 0 first, so a cut budget still
    leaves comparable sets)."""
    if study.tool:
        return _plan_tool_study(study, runs_root, data_root)
    missing = sorted({study.recipe_of(v) for v in study.variants
                      if not (ROOT / study.recipe_of(v)).is_file()})
    if missing:
        return StudyPlan(study, blocked=f"recipe missing: {', '.join(missing)}")
    # Without a data root the jobs are still planned (the root is not part of a run's
    # identity), so `list` shows them; `run` skips them (StudyPlan.no_data).
    root = data_root or NO_DATA
    common = [o.replace("{data}", root) for o in study.common]
    jobs: list[Job | ToolJob] = []
    try:
        for v in study.variants:
            overrides = tuple(o.replace("{data}", root) for o in v.overrides)
            jobs += plan(str(ROOT / study.recipe_of(v)), common, [Variant(v.name, overrides)],
                         study.seeds, runs_root / study.name, IDENTITY_IGNORES)
    except ConfigError as e:
        if not data_root and study.needs_data:  # e.g. a label file looked up under the root
            return StudyPlan(study, blocked="needs the data root (--data DIR or SSL_EMA_DATA)")
        return StudyPlan(study, blocked=f"recipe rejected: {e}")
    order = {s: i for i, s in enumerate(study.seeds)}
    jobs.sort(key=lambda j: order[j.seed])  # stable: variants keep their order within a seed
    return StudyPlan(study, jobs, no_data=study.needs_data and not data_root)


def _plan_tool_study(study: Study, runs_root: Path, data_root: str | None) -> StudyPlan:
    missing = sorted({study.tool_of(v) for v in study.variants
                      if not (ROOT / study.tool_of(v)).is_file()})
    if missing:
        return StudyPlan(study, blocked=f"tool missing: {', '.join(missing)}")
    try:
        jobs = plan_tool(study, ROOT, runs_root, data_root or NO_DATA)
    except (ValueError, ConfigError) as e:
        if not data_root and study.needs_data:
            return StudyPlan(study, blocked="needs the data root (--data DIR or SSL_EMA_DATA)")
        return StudyPlan(study, blocked=f"arguments rejected: {e}")
    return StudyPlan(study, list(jobs), no_data=study.needs_data and not data_root)


def this_device() -> str:
    """``cuda (<name>)`` or ``cpu``: the kind of device estimates are matched on."""
    import torch

    return f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"


def status(job: Job | ToolJob, store: Store) -> tuple[str, float]:
    """(done | partial | pending, fraction trained)."""
    if store.find(job) is not None or job.action == "reuse":
        return "done", 1.0
    if job.action == "resume" and job.run_dir is not None:
        steps = json.loads((job.run_dir / "header.json").read_text()).get("steps") or 0
        done = int(checkpoints(job.run_dir)[-1].name.split("_")[-1])
        return "partial", min(1.0, done / steps) if steps else 0.0
    return "pending", 0.0


def estimate_s(study: Study, job: Job | ToolJob, store: Store, device: str,
               speeds: Speeds | None = None) -> tuple[float, str]:
    """Seconds for the whole job on ``device`` and where the figure comes from: measured here,
    measured elsewhere × the measured speed ratio, or the study's stated figure
    (``study.estimate_source``), carried by the ratio where there is one."""
    speeds, kind = speeds or Speeds({}), device_kind(device)
    timed = [r for r in store.records if r.get("wall_s")]
    for pool, source in (([r for r in timed if r["variant"] == job.variant], "measured"),
                         (timed, "measured (other variants)")):
        here = [r for r in pool if device_kind(r["device"]) == kind]
        if here:
            return sum(r["wall_s"] for r in here) / len(here), source
        carried = [(r["wall_s"] * ratio, r["device"]) for r in pool
                   if (ratio := speeds.ratio(kind, r["device"])) is not None]
        if carried:
            ratio = speeds.ratio(kind, carried[0][1])
            return (sum(s for s, _ in carried) / len(carried),
                    f"{source} on {short(carried[0][1])} × {ratio:.2f} (speed ratio)")
    minutes = next(v.minutes for v in study.variants if v.name == job.variant)
    seconds = 60.0 * (minutes or study.minutes_per_run)
    if (study.device == "cpu") == (kind == "cpu"):
        ratio = speeds.ratio(kind, REFERENCE_GPU) if kind != "cpu" else None
        if ratio is not None and kind != REFERENCE_GPU:
            return seconds * ratio, f"stated for the H100 × {ratio:.2f} (speed ratio)"
        return seconds, "stated"
    return seconds, f"stated for {study.device.upper()}"


def child_env(study: Study, jobs: int = 1) -> dict[str, str]:
    """tools/train.py's environment: this checkout first on the path, the study's settings.
    With several runs at once, a study that does not set its thread count gets its share of
    the cores (threads that wait for each other's cores make each step several times slower)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if jobs > 1:
        env["SSL_EMA_CPU_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    env.update(study.env)
    return env


@dataclass(frozen=True)
class Budget:
    seconds: float
    reserve_s: float  # kept free at the end: the final evaluation, checkpoint, exit
    min_slice_s: float  # a job longer than the whole budget starts only with this much left
    slices: bool = False  # start such a job at all (its checkpoint must outlive the budget)

    @classmethod
    def of(cls, seconds: float, slices: bool = False) -> Budget:
        return cls(seconds, reserve_s=min(45.0, 0.15 * seconds), min_slice_s=0.25 * seconds,
                   slices=slices)

    def admits(self, need: float, left: float) -> tuple[bool, float]:
        """Whether a job needing ``need`` seconds starts with ``left`` seconds of the budget
        left, and its usable seconds (before the reserve)."""
        usable = left - self.reserve_s
        longer_than_all = need > self.seconds - self.reserve_s
        sliced = self.slices and longer_than_all and usable >= self.min_slice_s
        return need <= usable or sliced, usable


def spend(plans: Sequence[StudyPlan], stores: dict[str, Store], budget: Budget, device: str,
          launch: str = "", log: Callable[[str], None] = print,
          clock: Callable[[], float] = time.monotonic, speeds: Speeds | None = None,
          stored: Callable[[StudyPlan], None] | None = None, jobs: int = 1) -> list[str]:
    """Train pending jobs in priority order within ``budget``, up to ``jobs`` at once; store
    each finished run at once (``stored(plan)`` is called after its record is in the store).
    Returns the names of the studies that changed.

    A job is admitted when a slot frees, against the budget left then, so every run started
    can finish; records are written here, in one thread, whichever run ends first."""
    start, changed = clock(), []
    slots = Slots(jobs)

    def finish(p: StudyPlan, job: Job | ToolJob, t0: float, code: int) -> None:
        store, wall = stores[p.study.name], clock() - t0
        done = _after_tool(job, store, wall, code, device, log) if isinstance(job, ToolJob) \
            else _after(job, store, wall, code, log)
        if done and stored is not None:
            stored(p)
            log("   stored")
        changed.append(p.study.name)

    with slots.interruptible(finish):
        for p in plans:
            store = stores[p.study.name]
            for job in p.jobs:
                state, fraction = status(job, store)
                if state == "done":
                    continue  # (collect() stores finished runs)
                alone = p.study.timed  # a benchmark shares the cores with no other run
                slots.wait_until(0 if alone else jobs - 1, finish)
                left = budget.seconds - (clock() - start)
                need = estimate_s(p.study, job, store, device, speeds)[0] * (1.0 - fraction)
                starts, usable = budget.admits(need, left)
                if not starts:
                    log(f"{p.study.name} {job.variant} seed {job.seed}: skipped, needs "
                        f"~{need / 60:.1f} min, {max(usable, 0) / 60:.1f} min left"
                        + ("" if budget.slices or need <= budget.seconds - budget.reserve_s
                           else " (longer than the whole budget: --slice starts it anyway)"))
                    continue
                cmd = tool_command(ROOT, job) if isinstance(job, ToolJob) else \
                    train_command(launch, str(ROOT / p.study.recipe_of(
                        next(v for v in p.study.variants if v.name == job.variant))), job, usable)
                log(f"== {p.study.name} {job.variant} seed {job.seed} ({job.action}, "
                    f"~{need / 60:.1f} min, {usable / 60:.1f} min usable)")
                # The backstop ends by the budget's end: SIGTERM, then SIGKILL `grace` later.
                grace = min(GRACE_S, budget.reserve_s / 2)
                slots.start((p, job, clock()), run_process, cmd,
                            child_env(p.study, 1 if alone else jobs), left - grace, grace)
                if alone:
                    slots.wait_until(0, finish)
        slots.drain(finish)
    return list(dict.fromkeys(changed))


def collect(plan: StudyPlan, store: Store) -> bool:
    """Store every finished run of the plan that is not stored yet; whether any was added."""
    added = False
    for job in plan.jobs:
        if job.action == "reuse" and job.run_dir is not None and store.find(job) is None:
            store.put(tool_record(job) if isinstance(job, ToolJob) else record(job, job.run_dir))
            added = True
    return added


def _after(job: Job, store: Store, wall: float, code: int, log: Callable[[str], None]) -> bool:
    """Book the segment's wall time; store the record if the run finished (True)."""
    _, run_dir = locate(job.home, job.cfg, IDENTITY_IGNORES)
    if run_dir is not None:
        add_wall(run_dir, wall)
    done = finished_run(job.home, job.cfg, IDENTITY_IGNORES)
    if done is not None:
        store.put(record(job, done))
        log(f"   finished in {wall:.0f} s")
        return True
    log(f"   {_ended(code, budget_codes=(3, -15, 143))} after {wall:.0f} s"
        + (f"; resumes from {run_dir}" if run_dir else ""))
    return False


def _after_tool(job: ToolJob, store: Store, wall: float, code: int, device: str,
                log: Callable[[str], None]) -> bool:
    """A tool run has no checkpoint: it is stored when it wrote its JSON and exited 0."""
    if code == 0 and after_tool(job, device, wall):
        store.put(tool_record(job))
        log(f"   finished in {wall:.0f} s")
        return True
    log(f"   {_ended(code, budget_codes=(-15, 143))} after {wall:.0f} s (a tool run starts "
        "again next time)")
    return False


def _ended(code: int, budget_codes: tuple[int, ...]) -> str:
    """How an unfinished run ended, from its exit code."""
    if code in (INTERRUPTED, -signal.SIGINT):
        return "interrupted"
    return "cut by the budget" if code in budget_codes else f"exit code {code}"
