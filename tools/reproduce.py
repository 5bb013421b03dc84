#!/usr/bin/env python
"""Reproduce the papers' claims: list the studies, spend a time budget on them, report.

    python tools/reproduce.py list [STUDY ...]
    python tools/reproduce.py run [STUDY ...] --budget 12m [--data DATA_ROOT]
    python tools/reproduce.py report

``list``: every study (ssl_ema/reproduce/catalog.py, in priority order), its runs, their status
(done / partial / pending) and the estimated minutes on this device (measured from the study's
stored runs where there are any, else the study's stated figure).
``run``: trains pending runs in priority order while they fit the budget (each stops itself at
the budget's end with a checkpoint; the next ``run`` resumes it), stores each finished run in
``docs/results/<study>.json`` and regenerates the report. GPU studies are skipped on a CPU.
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


def list_studies(plans: Sequence[StudyPlan], results: Path, device: str) -> None:
    for p in plans:
        s = p.study
        if p.blocked:
            minutes = sum(v.minutes or s.minutes_per_run for v in s.variants) * len(s.seeds)
            print(f"{s.name} ({s.device}): {p.blocked}; {len(s.variants) * len(s.seeds)} runs, "
                  f"stated ~{minutes:g} min ({s.estimate_source})")
            continue
        store, lines, counts, left = Store(results, s.name), [], {}, 0.0
        for job in p.jobs:
            state, fraction = status(job, store)
            counts[state] = counts.get(state, 0) + 1
            seconds, source = estimate_s(s, job, store, device)
            rest = seconds * (1 - fraction)
            left += rest
            what = state if state != "partial" else f"partial {100 * fraction:.0f}%"
            cost = "" if state == "done" else f", ~{rest / 60:.1f} min ({source})"
            lines.append(f"  {job.variant} seed {job.seed}: {what}{cost}")
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        why = p.why_not_here(device)
        print(f"{s.name} ({s.device}): {summary}; ~{left / 60:.1f} min left"
              + (f" ({why})" if why else "") + f"\n  stated estimate: {s.estimate_source}")
        print("\n".join(lines))


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
    parser.add_argument("--budget", default=None, help="run: wall-clock budget, e.g. 12m")
    parser.add_argument("--data", default=os.environ.get("SSL_EMA_DATA"),
                        help="data root (default: $SSL_EMA_DATA)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "reproduce")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--launch", default="", help="how to start each run (default: this "
                        "Python), e.g. \"accelerate launch --num_processes 8\"")
    args = parser.parse_args(argv)
    known = {s.name for s in studies}
    try:
        unknown = [n for n in args.studies if n not in known]
        if unknown:
            raise ValueError(f"unknown study '{unknown[0]}'; known: {', '.join(sorted(known))}")
        budget = parse_budget(args.budget) if args.budget else None
        if args.command == "run" and budget is None:
            raise ValueError("run needs --budget (e.g. --budget 12m)")
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
        list_studies(plans, args.results, device)
        return 0
    if args.command == "run":
        stores = {p.study.name: Store(args.results, p.study.name) for p in plans}
        runnable = []
        for p in plans:
            why = p.why_not_here(device)
            if why:
                print(f"{p.study.name}: skipped ({why})")
                continue
            collect(p, stores[p.study.name])
            runnable.append(p)
        spend(runnable, stores, Budget.of(budget or 0.0), device, args.launch)
        for p in runnable:
            store = stores[p.study.name]
            store.save(p.jobs)
            print(f"{p.study.name}: {len(store.current(p.jobs))} of {len(p.jobs)} runs stored")
    # the report covers every study, whichever were named
    path = report(studies, [plan_study(s, runs, args.data) for s in studies], args.results)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
