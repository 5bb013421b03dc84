#!/usr/bin/env python
"""Reproduce the papers' claims: list the studies, spend a time budget on them, report.

    python tools/reproduce.py list [STUDY ...]
    python tools/reproduce.py run [STUDY ...] --budget 9m [--data DATA_ROOT] [--out DIR] [--slice]
                                  [--jobs N]
    python tools/reproduce.py report

``list``: every study (ssl_ema/reproduce/catalog.py, in priority order), its runs, their status
(done / partial / pending) and the estimated minutes on this device (measured from the study's
stored runs where there are any, on another device carried by the measured speed ratio in
``docs/results/devices.json``, else the study's stated figure).
``run``: trains pending runs in priority order, each only if the rest of the budget can finish
it (each stops itself at the budget's end with a checkpoint; the next ``run`` resumes it), and
stores each finished run in ``docs/results/<study>.json`` as soon as it ends, then regenerates
the report. ``--out DIR`` (a GPU lease) also packs everything the lease must return into
``DIR/results.tar.gz`` after every run; ``--slice`` starts a run longer than the whole budget
(its checkpoint must then survive until the next ``run``). ``--jobs N`` trains N runs at once
(default: on a CPU, one per core, since the CPU studies run one torch thread a run and a 2-core
laptop then does two runs in the time of one; on a GPU, one). GPU studies are skipped on a CPU,
CPU studies on a GPU unless named.
``report``: regenerates ``docs/results/REPORT.md`` and the figures from the stored records.
Runs live under ``--runs`` (default runs/reproduce) and are identified by their resolved config:
a changed recipe re-runs, an unchanged one is reused. The data root (CIFAR-10 JPEG copy in
``<root>/cifar10``, CIFAR-10N in ``<root>/cifar10n``) comes from ``--data`` or SSL_EMA_DATA.
Bad input is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ssl_ema.reproduce.catalog import STUDIES
from ssl_ema.reproduce.devices import Speeds, device_kind
from ssl_ema.reproduce.lease import COMMAND_S, SETUP_S, pack, schedule
from ssl_ema.reproduce.processes import INTERRUPTED, makespan
from ssl_ema.reproduce.report import analyse, figure, section, write_report
from ssl_ema.reproduce.runner import (
    ROOT,
    Budget,
    StudyPlan,
    collect,
    estimate_s,
    plan_study,
    spend,
    status,
    this_device,
)
from ssl_ema.reproduce.store import Store
from ssl_ema.reproduce.study import Study

_BUDGET = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")


def parse_budget(text: str) -> float:
    """'12m', '90s', '1.5h' or minutes as a bare number -> seconds; ValueError if malformed."""
    m = _BUDGET.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--budget: '{text}' is not a duration; write e.g. 12m, 600s or 1h")
    return float(m.group(1)) * {"s": 1, "m": 60, "": 60, "h": 3600}[m.group(2)]


def list_studies(plans: Sequence[StudyPlan], results: Path, device: str, jobs: int = 1) -> None:
    speeds = Speeds.load(results)
    for p in plans:
        s = p.study
        if p.blocked:
            minutes = sum(v.minutes or s.minutes_per_run for v in s.variants) * len(s.seeds)
            print(f"{s.name} ({s.device}): {p.blocked}; {len(s.variants) * len(s.seeds)} runs, "
                  f"stated ~{minutes:g} min ({s.estimate_source})")
            continue
        store, lines, counts, rests = Store(results, s.name), [], {}, []
        for job in p.jobs:
            state, fraction = status(job, store)
            counts[state] = counts.get(state, 0) + 1
            seconds, source = estimate_s(s, job, store, device, speeds)
            rest = seconds * (1 - fraction)
            rests += [rest] if state != "done" else []
            what = state if state != "partial" else f"partial {100 * fraction:.0f}%"
            cost = "" if state == "done" else f", ~{rest / 60:.1f} min ({source})"
            lines.append(f"  {job.variant} seed {job.seed}: {what}{cost}")
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        why = p.why_not_here(device, named=True)
        at_once = makespan(rests, 1 if s.timed else jobs)
        print(f"{s.name} ({s.device}): {summary}; ~{sum(rests) / 60:.1f} min of runs left"
              + (f", ~{at_once / 60:.1f} min with {jobs} at once" if at_once < sum(rests) else "")
              + (f" ({why})" if why else "") + f"\n  stated estimate: {s.estimate_source}")
        print("\n".join(lines))


def default_jobs(asked: int | None, device: str) -> int:
    """Runs at once: as asked, else one per core on a CPU (each CPU study runs one torch
    thread a run) and one on a GPU."""
    return asked or ((os.cpu_count() or 1) if device_kind(device) == "cpu" else 1)


def list_leases(plans: Sequence[StudyPlan], results: Path, device: str) -> None:
    """Which lease each pending run lands in on ``device`` (tools/lease.sh's budgets)."""
    leases, never = schedule(plans, device, Speeds.load(results), results)
    for i, lease in enumerate(leases, 1):
        smoke = " (with the smoke check)" if i == 1 else ""
        total = sum(s for _, s in lease) / 60
        print(f"lease {i}{smoke}: ~{total:.1f} min of runs")
        print("\n".join(f"  {name}: ~{s / 60:.1f} min" for name, s in lease))
    two = 2 * (COMMAND_S - SETUP_S)
    for name, s in never:
        how = "--slice over two commands of one lease" if s <= two else "longer than a lease"
        print(f"no lease: {name} (~{s / 60:.1f} min: longer than one command; {how})")


def report(studies: Sequence[Study], plans: Sequence[StudyPlan], results: Path) -> Path:
    """Store finished local runs, analyse every study, write figures and REPORT.md."""
    results.mkdir(parents=True, exist_ok=True)
    parts = []
    for s, p in zip(studies, plans):
        store = Store(results, s.name)
        if not p.blocked:
            collect(p, store)
            records = store.current(p.jobs)
        else:
            records = store.records  # cannot be checked against a recipe that is missing
        result = analyse(s, records)
        fig = figure(s, records, results)
        why = p.blocked or ("needs the data root to run" if p.no_data else "")
        parts.append(section(s, records, len(p.jobs), why, result, fig))
        if not p.blocked:
            store.analysis = {"verdict": result.verdict, "summary": result.summary}
            store.save(p.jobs)
    return write_report(parts, results)


def main(argv: list[str] | None = None, studies: Sequence[Study] = STUDIES) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("list", "run", "report"))
    parser.add_argument("studies", nargs="*", help="study names (default: all)")
    parser.add_argument("--budget", default=None, help="run: wall-clock budget, e.g. 9m")
    parser.add_argument("--out", type=Path, default=None, help="run: also pack the records "
                        "and run files into OUT/results.tar.gz after every run (a GPU lease)")
    parser.add_argument("--slice", action="store_true", help="run: start a run longer than the "
                        "whole budget (it resumes from its checkpoint at the next run)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: "
                        "one per core on a CPU, 1 on a GPU)")
    parser.add_argument("--data", default=os.environ.get("SSL_EMA_DATA"),
                        help="data root (default: $SSL_EMA_DATA)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--device", default=None, help="list: estimate for this device, e.g. "
                        "\"cuda (NVIDIA H200)\" (default: the one here)")
    parser.add_argument("--leases", action="store_true", help="list: which GPU lease each "
                        "pending run lands in (tools/lease.sh's budgets)")
    parser.add_argument("--launch", default="", help="how to start each run (default: this "
                        "Python), e.g. \"accelerate launch --num_processes 8\"")
    args = parser.parse_intermixed_args(argv)  # studies before or after the options
    known = {s.name for s in studies}
    try:
        unknown = [n for n in args.studies if n not in known]
        if unknown:
            raise ValueError(f"unknown study '{unknown[0]}'; known: {', '.join(sorted(known))}")
        budget = parse_budget(args.budget) if args.budget else None
        if args.command == "run" and budget is None:
            raise ValueError("run needs --budget (e.g. --budget 9m)")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs: {args.jobs}; give at least 1")
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out: '{args.out}' is not a folder")
        if args.data and not Path(args.data).is_dir():
            raise ValueError(f"--data: '{args.data}' is not a folder; pass the folder that "
                             "holds cifar10/ (and cifar10n/)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = [s for s in studies if not args.studies or s.name in args.studies]
    runs = args.runs.resolve()
    plans = [plan_study(s, runs, args.data) for s in chosen]
    device = this_device()
    if args.command == "list":
        device = args.device or device
        if args.leases:
            list_leases([p for p in plans if not p.why_not_here(device, bool(args.studies))
                         or p.no_data], args.results, device)
        else:
            list_studies(plans, args.results, device, default_jobs(args.jobs, device))
        return 0
    if args.command == "run":
        try:
            run(plans, args, runs, device, budget or 0.0)
        except KeyboardInterrupt:
            print("interrupted: the runs in progress stopped with a checkpoint (the next `run` "
                  "resumes them); every finished run is stored", file=sys.stderr)
            return INTERRUPTED
    # the report covers every study, whichever were named
    path = report(studies, [plan_study(s, runs, args.data) for s in studies], args.results)
    print(f"report: {path}")
    if args.out is not None:
        print(f"packed: {pack(args.out, ROOT, args.results, runs)}")
    return 0


def run(plans: Sequence[StudyPlan], args: argparse.Namespace, runs: Path, device: str,
        budget: float) -> None:
    """Spend the budget; every finished run is written to its study's file (and packed into
    ``--out``) as soon as it is stored, so that a kill loses no finished run."""
    stores = {p.study.name: Store(args.results, p.study.name) for p in plans}
    runnable = []
    for p in plans:
        why = p.why_not_here(device, named=p.study.name in args.studies)
        if why:
            print(f"{p.study.name}: skipped ({why})")
            continue
        if collect(p, stores[p.study.name]):
            stores[p.study.name].save(p.jobs)
        runnable.append(p)

    def stored(p: StudyPlan) -> None:
        stores[p.study.name].save(p.jobs)
        if args.out is not None:
            pack(args.out, ROOT, args.results, runs)

    if args.out is not None:
        pack(args.out, ROOT, args.results, runs)  # something comes back even if nothing runs
    jobs = default_jobs(args.jobs, device)
    spend(runnable, stores, Budget.of(budget, slices=args.slice), device, args.launch,
          speeds=Speeds.load(args.results), stored=stored, jobs=jobs)
    for p in runnable:
        store = stores[p.study.name]
        store.save(p.jobs)
        print(f"{p.study.name}: {len(store.current(p.jobs))} of {len(p.jobs)} runs stored")


if __name__ == "__main__":
    sys.exit(main())
