"""The post-hoc EMA of a training run (``ema.posthoc``): built, checkpointed and described.

The trainer holds a `ssl_ema.posthoc.PostHocEMA` of the student (the modules the teacher
averages, `TeacherStudentMethod.student_for_ema`), steps it after every optimizer step with the
samples seen, and stores its averages in each checkpoint as ``posthoc_ema.safetensors``; the
snapshots go to ``<run>/posthoc_ema/``. ``tools/posthoc_ema.py`` reconstructs and evaluates any
sigma_rel from them (docs/EVALUATION.md, "Post-hoc EMA against parallel EMAs").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ssl_ema.config import Config, ConfigError
from ssl_ema.posthoc import PostHocEMA

FOLDER = "posthoc_ema"  # <run>/posthoc_ema/: the snapshots
STATE_FILE = "posthoc_ema.safetensors"  # in each checkpoint: the power EMAs' averages
# ema.posthoc.every_samples = 0: this many snapshots over the run. EDM2 stores one every 8M
# images of 2.1G (about 256); a short run needs fewer: the fit of a profile barely changes
# once the snapshots are closer than its width (EDM2, App. C.2).
SNAPSHOTS_PER_RUN = 64


def averaged_tensors(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's floating tensors by state-dict name, live: the parameters and the
    BatchNorm statistics (recomputed before evaluation anyway, as for every EMA); integer
    buffers (BatchNorm's batch counter) are not averages and are left out."""
    return {name: t for name, t in student.state_dict(keep_vars=True).items()
            if t.is_floating_point()}


def snapshot_interval(cfg: Config, total_samples: int) -> int:
    return cfg.ema.posthoc.every_samples or max(1, total_samples // SNAPSHOTS_PER_RUN)


def build_posthoc(cfg: Config, student: nn.Module, run_dir: Path, total_samples: int,
                  write: bool, agree: Callable[[bool], bool] | None = None) -> PostHocEMA | None:
    """The run's post-hoc EMA (None when ``ema.posthoc.sigma_rels`` is empty); ``write``: this
    process stores the snapshots (the main one); ``agree``: with several processes, whether
    every one succeeded (so a failed snapshot stops them all)."""
    posthoc = cfg.ema.posthoc
    if not posthoc.sigma_rels:
        return None
    return PostHocEMA(averaged_tensors(student), posthoc.sigma_rels, run_dir / FOLDER,
                      snapshot_interval(cfg, total_samples), posthoc.dtype, write, agree)


def describe(tracker: PostHocEMA, total_samples: int) -> dict[str, Any]:
    """The header's record: what is tracked, where, and what it will cost on disk."""
    return {"sigma_rels": list(tracker.ema.sigma_rels),
            "gammas": [round(g, 4) for g in tracker.ema.gammas],
            "every_samples": tracker.interval, "dtype": tracker.dtype,
            "folder": str(tracker.folder), "bytes_per_snapshot": tracker.bytes_per_snapshot(),
            "projected_bytes": tracker.projected_bytes(total_samples)}


def describe_text(record: dict[str, Any]) -> str:
    """One console line of `describe`'s record."""
    widths = ", ".join(f"{s:g}" for s in record["sigma_rels"])
    return (f"post-hoc EMA: sigma_rel {widths}, a snapshot every {record['every_samples']} "
            f"samples ({record['dtype']}, {record['bytes_per_snapshot'] / 2**20:.1f} MiB each; "
            f"{record['projected_bytes'] / 2**20:.1f} MiB for the run) in {record['folder']}")


def state_bytes(tracker: PostHocEMA) -> bytes:
    """The averages as one safetensors file's bytes (tensors only: no unpickler to resume)."""
    return save({k: v.detach().to("cpu").contiguous() for k, v in tracker.state_dict().items()})


def load_state(tracker: PostHocEMA, checkpoint: Path) -> None:
    """Restore the averages from ``checkpoint``; snapshots written after it are removed."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {checkpoint} has no {STATE_FILE}: it was written "
                          "without ema.posthoc; resume with the run's own recipe")
    try:
        tracker.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"--resume: {path}: {e}") from None
