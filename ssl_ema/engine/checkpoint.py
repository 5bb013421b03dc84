"""Atomic checkpoints on top of `Accelerator.save_state`.

Accelerate writes model (safetensors), optimizer, grad scaler and every process's RNG state into
a folder; our counters (training state, EMA updates) go beside them as ``counters.json``, so
nothing in a checkpoint needs an unrestricted unpickler (Accelerate loads its files with
``weights_only=True``; it would unpickle registered custom objects without it). We write the
folder under a temporary name and rename it when complete, so an interrupted save never hides
the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PREFIX = "step_"
COUNTERS = "counters.json"


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int,
                    counters: dict[str, Any]) -> Path:
    """Save the full training state at ``step``; keep the newest ``keep`` checkpoints."""
    folder = run_dir / "checkpoints"
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COUNTERS).write_text(json.dumps(counters))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore Accelerate's state from ``path``; return our counters."""
    accelerator.load_state(str(path))
    return json.loads((path / COUNTERS).read_text())
