"""Stored results: one JSON file per study (``docs/results/<study>.json``), one record per run.

A record holds what the report needs and nothing that only exists on the machine that trained:
the resolved config, its identity key, the commit and device from the run's header, the wall
time, the final metrics and the evaluation curve. A run is identified by its resolved config:
a record matches a planned run when their configs agree (`ssl_ema.engine.run.config_changes`,
so an option added to ssl_ema since the record, left at its default, changes nothing), keys that
only say where things are or how they are logged (the sweep's bookkeeping keys, the data root)
left out; a moved data folder reuses the run and a changed recipe does not. ``config_key`` is
a short hash of the config, for people to tell records apart. Every file here is written
atomically and read guarded (`jsonfile`): a damaged one is set aside with a warning, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ssl_ema.config import Config, to_dict
from ssl_ema.engine.run import config_changes, flatten
from ssl_ema.engine.sweep import BOOKKEEPING, Job
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.eval.early_stopping import PREDICTIONS_FILE
from ssl_ema.reproduce.jsonfile import read_json, write_json
from ssl_ema.reproduce.tool_runs import ToolJob, matches

# Where the data lives, not what it is: a run is the same run wherever its data root is.
IDENTITY_IGNORES = BOOKKEEPING | {"data.root", "labels.noisy_file"}
WALL = "reproduce.json"  # beside a run: its wall time over every segment the runner started


def config_key(cfg: Config) -> str:
    """A run's identity: a hash of its resolved config without ``IDENTITY_IGNORES``."""
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in IDENTITY_IGNORES}
    blob = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def add_wall(run_dir: Path, seconds: float) -> None:
    """Add one segment's wall time to the run's total (a resumed run has several)."""
    path = run_dir / WALL
    write_json(path, {"wall_s": _booked(path, 0.0) + seconds}, indent=None)


def _booked(path: Path, default: float) -> float:
    raw = read_json(path)
    try:
        return float(raw["wall_s"]) if raw is not None else default
    except (TypeError, KeyError, ValueError):
        return default


def wall_seconds(run_dir: Path) -> float:
    """The runner's total, else the span from the header to results.json (a run trained
    outside the runner, e.g. by tools/sweep.py: process start-up not counted)."""
    span = (run_dir / "results.json").stat().st_mtime - (run_dir / "header.json").stat().st_mtime
    return _booked(run_dir / WALL, span)


def _numbers(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """results.json's numbers, with early stopping's choices as ``best_<kind>_<field>``."""
    out = _numbers(results)
    for key, value in results.items():
        if key.startswith("best_") and isinstance(value, Mapping):
            out.update({f"{key}_{k}": v for k, v in _numbers(value).items()})
    return out


def record(job: Job, run_dir: Path) -> dict[str, Any]:
    """The stored record of a finished run."""
    header = json.loads((run_dir / "header.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    curve = [{k: v for k, v in _numbers(e).items()}
             for e in read_metrics(run_dir / "metrics.jsonl") if e.get("event") == "eval"]
    finished = time.gmtime((run_dir / "results.json").stat().st_mtime)
    predictions = run_dir / PREDICTIONS_FILE  # EMA early stopping's choices (churn)
    extra = {"predictions": json.loads(predictions.read_text())} if predictions.is_file() else {}
    return {**extra, "variant": job.variant, "seed": job.seed, "key": config_key(job.cfg),
            "commit": header.get("git", "unknown"), "device": header.get("device", "unknown"),
            "date": time.strftime("%Y-%m-%d", finished), "wall_s": round(wall_seconds(run_dir), 1),
            "steps": header.get("steps"), "samples": header.get("samples"),
            "metrics": final_metrics(results), "curve": curve,
            "config": yaml.safe_load((run_dir / "config.yaml").read_text())}


class Store:
    """The records of one study, read from and written to ``<folder>/<study>.json``."""

    def __init__(self, folder: Path, study: str):
        self.path = folder / f"{study}.json"
        raw = read_json(self.path) or {}
        self.study = study
        self.records: list[dict[str, Any]] = list(raw.get("runs", []))
        self.analysis: dict[str, Any] = dict(raw.get("analysis", {}))

    def find(self, job: Job | ToolJob) -> dict[str, Any] | None:
        """The stored record of this job's config (a tool's: its resolved arguments), if any."""
        if isinstance(job, ToolJob):
            return next((r for r in self.records if matches(r, job)), None)
        return next((r for r in self.records if (r["variant"], r["seed"]) ==
                     (job.variant, job.seed) and not config_changes(
                         flatten(r["config"]), job.cfg, IDENTITY_IGNORES)), None)

    def current(self, jobs: Sequence[Job | ToolJob]) -> list[dict[str, Any]]:
        """Records that match the study's jobs as planned now (a changed recipe drops them)."""
        return [r for j in jobs if (r := self.find(j)) is not None]

    def put(self, rec: dict[str, Any]) -> None:
        self.records = [r for r in self.records
                        if (r["variant"], r["seed"]) != (rec["variant"], rec["seed"])] + [rec]

    def save(self, jobs: Sequence[Job | ToolJob]) -> None:
        """Write the records that match ``jobs`` (stale ones are dropped) and the analysis."""
        write_json(self.path, {"study": self.study, "analysis": self.analysis,
                               "runs": self.current(jobs)})
