"""Atomic, verified checkpoints on top of `Accelerator.save_state`.

Accelerate writes model (safetensors), optimizer, grad scaler and every process's RNG state into
a folder; our counters (training state, EMA updates) go beside them as ``counters.json``, so
nothing in a checkpoint needs an unrestricted unpickler (Accelerate loads its files with
``weights_only=True``; it would unpickle registered custom objects without it).

Writing: the folder is written under a temporary name, every file is fsynced, then
``manifest.json`` (every file's size and SHA-256) is written last and the folder renamed, so
an interrupted save never hides the previous checkpoint and a folder without a manifest is
never taken for one. A failed write (disk full, read-only directory) on any process stops every
process with :class:`CheckpointWriteError` and removes the half-written folder.
Reading: :func:`damage` compares the files with the manifest (a missing or truncated file, a
changed byte), so a resume can fall back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

PREFIX = "step_"
COUNTERS = "counters.json"
MANIFEST = "manifest.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the path and the last good one."""


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run (renamed into place, not yet verified), oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory too: its entries (the rename) reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(folder: Path) -> None:
    """fsync every file of ``folder``, then write (and fsync) its manifest, last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size,
                                                "sha256": _sha256(path)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    _fsync(manifest)
    _fsync(folder)


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` compared with its manifest, or None."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable (an incomplete save)"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} differs from its checksum in the manifest"
    return None


def _everyone(accelerator: Accelerator, ok: bool) -> bool:
    """Did every process succeed? (a collective, so all ranks take the same branch)"""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([float(ok)], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item() == 1.0)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int,
                    counters: dict[str, Any]) -> Path:
    """Save the full training state at ``step``; keep the newest ``keep`` checkpoints."""
    folder = run_dir / "checkpoints"
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}"
    main = accelerator.is_main_process
    error: OSError | None = None
    try:
        if main:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
    except OSError as e:
        error = e
    if _everyone(accelerator, error is None) and main:
        try:
            (tmp / COUNTERS).write_text(json.dumps(counters))
            _seal(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(folder)
        except OSError as e:
            error = e
    if not _everyone(accelerator, error is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, final, error)
    if main:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_error(run_dir: Path, final: Path, error: OSError | None) -> CheckpointWriteError:
    reason = (f"{error.strerror or error} ({error.filename or final})" if error is not None
              else "another process could not write its part")
    previous = [c for c in checkpoints(run_dir) if c != final]
    kept = (f"the last checkpoint, {previous[-1]}, is intact" if previous
            else "no checkpoint was written before")
    return CheckpointWriteError(f"could not write checkpoint {final}: {reason}; the run stopped "
                                f"and {kept}; free space or make {run_dir} writable, then "
                                "resume")


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore Accelerate's state from ``path``; return our counters."""
    accelerator.load_state(str(path))
    return json.loads((path / COUNTERS).read_text())
