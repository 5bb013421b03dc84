"""Studies whose runs are a tool, not a training: the noisy quadratic and the benchmarks.

A tool study (``Study.tool``, or a variant's own ``tool``: a script under tools/) runs
``python <tool> <variant's args> --json <home>/result.json`` once per variant. Its identity is
the tool's *resolved* arguments: each tool has ``resolve(argv) -> dict`` (its defaults filled
in, where it writes left out), so a changed default or argument re-runs and an unchanged one
is reused, as a resolved config is for a training run. A tool run is short and has no
checkpoint: a run the budget cuts starts again. The record (``store.py``'s layout) keeps the
tool's JSON as ``result`` (its curves moved to ``curve``, thinned) and its numbers, dicts
flattened with ``/``, with the curves' last points, as ``metrics``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from ssl_ema.engine.tracking import git_sha
from ssl_ema.reproduce.jsonfile import read_json, write_json
from ssl_ema.reproduce.study import Study

RESULT = "result.json"  # the tool's JSON in the job's home
RUN = "reproduce"  # the key after_tool adds to it: identity, commit, device, wall time
MAX_CURVE_POINTS = 51  # a stored curve is thinned to about this many points


@dataclass(frozen=True)
class ToolJob:
    """One variant of a tool study; the same fields the runner reads of a training ``Job``."""

    variant: str
    seed: int
    tool: str  # the script, relative to the checkout
    args: tuple[str, ...]
    resolved: dict[str, Any]  # JSON-normalised: compared with a stored record's config
    home: Path
    action: str  # "reuse" (its result is there and matches) | "new"
    run_dir: Path | None


@cache
def load_tool(path: Path) -> ModuleType:
    """A tools/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"ssl_ema_tool_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def plan_tool(study: Study, root: Path, runs_root: Path, data_root: str) -> list[ToolJob]:
    """A job per variant; ValueError (bad arguments) if the tool rejects one."""
    jobs = []
    for v in study.variants:
        tool = load_tool(root / study.tool_of(v))
        args = tuple(a.replace("{data}", data_root) for a in v.overrides)
        try:
            resolved = _normalised(tool.resolve(list(args)))
        except SystemExit as e:  # argparse's error: already printed its line
            raise ValueError(f"variant '{v.name}': {study.tool_of(v)} rejects "
                             f"{list(args)}") from e
        home = runs_root / study.name / v.name / "seed0"
        done = read_json(home / RESULT)  # a damaged one is set aside: the run starts again
        same = done is not None and same_identity(done.get(RUN, {}).get("resolved"), resolved)
        jobs.append(ToolJob(v.name, 0, study.tool_of(v), args, resolved, home,
                            "reuse" if same else "new", home if same else None))
    return jobs


def tool_command(root: Path, job: ToolJob) -> list[str]:
    job.home.mkdir(parents=True, exist_ok=True)
    (job.home / RESULT).unlink(missing_ok=True)  # a stale result must not count as this run's
    return [sys.executable, str(root / job.tool), *job.args, "--json", str(job.home / RESULT)]


def after_tool(job: ToolJob, device: str, wall_s: float) -> bool:
    """Mark the tool's JSON with the run's identity, commit, device and wall time, which
    ``tool_record`` reads back (a finished run is stored later by ``collect`` too); False if
    the tool left no readable JSON."""
    path = job.home / RESULT
    result = read_json(path)
    if result is not None:
        load = round(os.getloadavg()[0], 2)
        if device == "cpu":  # a CPU timing means little without the cores and their load
            device = f"cpu ({os.cpu_count()} cores, load {load:g})"
        result[RUN] = {"resolved": job.resolved, "commit": git_sha(), "device": device,
                       "wall_s": round(wall_s, 1), "load": load}
        write_json(path, result)
    return result is not None


def matches(record: Mapping[str, Any], job: ToolJob) -> bool:
    return (record["variant"], record["seed"]) == (job.variant, job.seed) and \
        same_identity(record.get("config"), job.resolved)


def same_identity(stored: Any, resolved: Mapping[str, Any]) -> bool:
    """Whether a stored run's resolved arguments are ``resolved``'s. A tool that trains first
    (``"train"``: a resolved training config) is compared as training runs are
    (`ssl_ema.engine.run.config_changes`): options added since, at their defaults, and keys
    renamed or left out of a run's config since still match, so a stored study survives a
    config layout change and re-runs only when a value that decides the result changed."""
    if not isinstance(stored, Mapping) or stored.keys() != resolved.keys():
        return False
    if "train" not in resolved:
        return dict(stored) == dict(resolved)
    if {k: v for k, v in stored.items() if k != "train"} != \
            {k: v for k, v in resolved.items() if k != "train"}:
        return False
    from ssl_ema.config import from_dict
    from ssl_ema.engine.run import config_changes, flatten

    return not config_changes(flatten(stored["train"]), from_dict(resolved["train"]), set())


def flat_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a JSON object, nested objects' keys joined with ``/`` (lists left out)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def thinned_curve(curves: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """``{"samples": [...], name: [...]}`` -> evaluation-style points (``samples_seen`` and one
    key per series), about ``MAX_CURVE_POINTS`` of them, the last always kept."""
    xs = curves["samples"]
    step = max(1, (len(xs) - 1) // (MAX_CURVE_POINTS - 1))
    keep = sorted({*range(0, len(xs), step), len(xs) - 1})
    return [{"samples_seen": xs[i], **{k: round(float(c[i]), 6) for k, c in curves.items()
                                       if k != "samples"}} for i in keep]


def tool_record(job: ToolJob) -> dict[str, Any]:
    """The stored record of a finished tool run (its home holds the tool's JSON)."""
    path = job.home / RESULT
    result = json.loads(path.read_text())
    run = result.pop(RUN)
    curves = result.pop("curves", None)
    curve = thinned_curve(curves) if curves else []
    final = {k: v for k, v in curve[-1].items() if k != "samples_seen"} if curve else {}
    key = hashlib.sha256(json.dumps(job.resolved, sort_keys=True).encode()).hexdigest()[:16]
    return {"variant": job.variant, "seed": job.seed, "key": key, "commit": run["commit"],
            "device": run["device"],
            "date": time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime)),
            "wall_s": run["wall_s"], "load": run["load"],
            "metrics": {**flat_numbers(result), **final}, "curve": curve, "result": result,
            "config": job.resolved}
