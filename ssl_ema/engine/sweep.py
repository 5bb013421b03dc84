"""Several variants of one recipe, each seed a run of its own: plan, reuse, tabulate.

``tools/sweep.py`` runs ``variant x seed`` as separate ``tools/train.py`` processes, each in
``<out>/<variant>/seed<N>/<timestamp>``. This module decides what each one needs:

- a finished run whose resolved config is the same (``results.json`` present) is *reused*, so a
  sweep cut short (a GPU lease, a 10-minute command limit) continues where it stopped;
- an unfinished one with checkpoints is *resumed* (``tools/train.py --resume``);
- anything else is a *new* run.

Only keys that change bookkeeping, never the trajectory, may differ between a reused run and the
sweep (``BOOKKEEPING``); ``train.max_steps`` is not one of them here, unlike for ``--resume``,
because a result at 100 steps is not a result at 582.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ssl_ema.config import Config, ConfigError, load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.run import changed_keys

BOOKKEEPING = {"data.num_workers", "train.log_every", "train.checkpoint_every",
               "train.checkpoint_every_minutes",
               "train.keep_checkpoints", "run.output_dir", "run.name", "run.log_with"}
# results.json keys that count, not score
NOT_METRICS = {"step", "samples_seen", "skipped_steps"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """One (variant, seed): the overrides ``tools/train.py`` gets and what to do with them."""

    variant: str
    seed: int
    overrides: tuple[str, ...]
    cfg: Config
    home: Path  # <out>/<variant>/seed<N>: the run's output_dir/name
    action: str  # "reuse" | "resume" | "new"
    run_dir: Path | None  # the run to reuse or resume


TRAIN = Path(__file__).resolve().parents[2] / "tools" / "train.py"


def train_command(launch: str, recipe: str, job: Job, stop_after_s: float | None = None
                  ) -> list[str]:
    """The command that trains (or resumes) one job: ``launch`` (default: this Python) +
    tools/train.py + overrides; ``stop_after_s``: its --stop-after deadline."""
    cmd = [*(shlex.split(launch) if launch else [sys.executable]), str(TRAIN), recipe,
           *job.overrides]
    if job.action == "resume":
        cmd += ["--resume", str(job.run_dir)]
    return cmd + ([] if stop_after_s is None else ["--stop-after", f"{stop_after_s:g}"])


def parse_variant(tokens: Sequence[str]) -> Variant:
    """``NAME [key=value ...]`` (one ``--variant``) -> Variant; ConfigError if malformed."""
    if not tokens:
        raise ConfigError("--variant: give a name, then key=value overrides (e.g. --variant "
                          "torch_init model.init=torch)")
    name, *overrides = tokens
    if not _NAME.match(name) or "=" in name:
        raise ConfigError(f"--variant: '{name}' is not a variant name; start with the name "
                          "(letters, digits, _ . -), then key=value overrides")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--variant {name}: '{bad[0]}' is not a key=value override")
    return Variant(name, tuple(overrides))


def same_training(run_dir: Path, cfg: Config, ignore: set[str] = BOOKKEEPING) -> bool:
    """Whether the run's saved config trains exactly like ``cfg`` (``ignore``d keys aside)."""
    return not changed_keys(run_dir, cfg, ignore)


def locate(home: Path, cfg: Config, ignore: set[str] = BOOKKEEPING) -> tuple[str, Path | None]:
    """What a (variant, seed) needs, from its earlier runs under ``home`` (newest first):
    ``reuse`` a finished run, ``resume`` one with checkpoints, or ``new``."""
    runs = sorted((p for p in home.glob("*") if (p / "config.yaml").is_file()), reverse=True)
    for run in runs:
        if not same_training(run, cfg, ignore):
            continue
        if (run / "results.json").is_file():
            return "reuse", run
        if checkpoints(run):
            return "resume", run
    return "new", None


def plan(recipe: str, common: Sequence[str], variants: Sequence[Variant],
         seeds: Sequence[int], out: Path, ignore: set[str] = BOOKKEEPING) -> list[Job]:
    """Every job of the sweep, all configs validated first (ConfigError names the variant).
    Earlier runs that differ from a job only in ``ignore``d keys count as the same run."""
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"--variant: the name '{dup}' is used twice; give each variant its own")
    seeds = list(seeds) or [load_config(recipe, common).run.seed]
    jobs = []
    for v in variants:
        for seed in seeds:
            home = out / v.name / f"seed{seed}"
            overrides = (*common, *v.overrides, f"run.seed={seed}",
                         f"run.output_dir={home.parent}", f"run.name={home.name}")
            try:
                cfg = load_config(recipe, overrides)
            except ConfigError as e:
                raise ConfigError(f"variant '{v.name}': {e}") from None
            action, run_dir = locate(home, cfg, ignore)
            jobs.append(Job(v.name, seed, overrides, cfg, home, action, run_dir))
    return jobs


def finished_run(home: Path, cfg: Config, ignore: set[str] = BOOKKEEPING) -> Path | None:
    """The newest finished run under ``home`` that trains like ``cfg`` (after the job ran)."""
    action, run = locate(home, cfg, ignore)
    return run if action == "reuse" else None


def metrics(run_dir: Path) -> dict[str, float]:
    """The numeric final metrics of a finished run (``results.json``)."""
    raw = json.loads((run_dir / "results.json").read_text())
    return {k: float(v) for k, v in raw.items()
            if k not in NOT_METRICS and isinstance(v, (int, float))}


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Per run (variant, seed, what happened, wall s, metrics); then mean ± sd per variant when
    a variant has several seeds. Failed runs show their exit code and no metrics."""
    head = ["variant", "seed", "run", "wall s", *columns]
    lines = [head]
    for r in rows:
        m = r.get("metrics") or {}
        wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        lines.append([r["variant"], str(r["seed"]), r["status"],
                      wall, *(f"{m[c]:.4f}" if c in m else "-" for c in columns)])
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("metrics"):
            by_variant.setdefault(r["variant"], []).append(r["metrics"])
    summary = []
    for name, ms in by_variant.items():
        if len(ms) < 2:
            continue
        cells = []
        for c in columns:
            xs = [m[c] for m in ms if c in m]
            if xs:
                mean, sd = mean_std(xs)
                cells.append(f"{mean:.4f}±{sd:.4f}")
            else:
                cells.append("-")
        summary.append([name, f"{len(ms)} seeds", "mean±sd", "", *cells])
    widths = [max(len(row[i]) for row in lines + summary) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*row) for row in lines]
    if summary:
        out.append("")
        out += [fmt.format(*row) for row in summary]
    return "\n".join(out)
