"""What a run writes besides checkpoints: the header, resolved config and JSONL metrics."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def git_sha() -> str:
    """Commit of the ssl_ema checkout (with '+dirty' for uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import accelerate
    import lightly
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "lightly": lightly.__version__, "accelerate": accelerate.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()}, "\
           f"{torch.get_num_threads()} threads)"


class MetricsLog:
    """Append-only JSONL file, one object per logged event; written by the main process only.
    ``mirror``, if given, gets each record after it is written (the experiment trackers,
    `ssl_ema.engine.trackers`)."""

    def __init__(self, path: Path, enabled: bool,
                 mirror: Callable[[dict[str, Any]], None] | None = None):
        self.path, self.enabled, self.mirror = path, enabled, mirror

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.mirror is not None:
            self.mirror(record)

    def keep_until(self, step: int, drop_eval_at_step: bool = False) -> None:
        """On resume from a checkpoint at ``step``: drop the records of later steps (the resumed
        run writes them again), the evaluation at ``step`` too if asked (the final one, redone),
        and a line cut short by a killed process."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            at = record.get("step", -1)
            if at < step or (at == step and not (drop_eval_at_step and record["event"] == "eval")):
                kept.append(line + "\n")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
