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
Reading (the checks against the manifest, the one picker of a run's checkpoint) is
`ssl_ema.run_files`, below the engine and the evaluation alike. Only intact checkpoints count
towards ``train.keep_checkpoints``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from ssl_ema.engine.fsync import fsync
from ssl_ema.run_files import (
    COUNTERS,
    MANIFEST,
    PREFIX,
    TMP,
    checkpoints,
    damage,
    intact,
    is_intact,
    sha256,
    warn,
)

# What a failed write raises: OSError from Python's own writes, SafetensorError (safetensors,
# the model) and RuntimeError (torch.save's "PytorchStreamWriter failed writing file") from
# the libraries', which report a full disk without an errno.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)

class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the path and the last good one."""




def _seal(folder: Path) -> None:
    """fsync every file of ``folder``, then write (and fsync) its manifest, last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size,
                                                "sha256": sha256(path)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    fsync(manifest)
    fsync(folder)


def everyone(accelerator: Accelerator, ok: bool) -> bool:
    """Did every process succeed? (a collective, so all ranks take the same branch)"""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([float(ok)], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item() == 1.0)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int,
                    counters: dict[str, Any], files: Mapping[str, bytes] | None = None) -> Path:
    """Save the full training state at ``step``; keep the newest ``keep`` intact checkpoints.
    ``files`` (name -> contents, the main process's) are written beside ``counters.json``
    before the manifest, so they are checked like every other file of the checkpoint."""
    folder = run_dir / "checkpoints"
    final, tmp = folder / f"{PREFIX}{step:08d}", folder / f"{TMP}{PREFIX}{step:08d}"
    main = accelerator.is_main_process
    error: Exception | None = None
    if main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            error = e
    accelerator.wait_for_everyone()
    if error is None:
        try:
            accelerator.save_state(str(tmp))
        except WRITE_ERRORS as e:
            error = e
    if everyone(accelerator, error is None) and main:
        try:
            (tmp / COUNTERS).write_text(json.dumps(counters))
            for name, contents in (files or {}).items():
                (tmp / name).write_bytes(contents)
            _seal(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync(folder)
            intact.add(final)
        except OSError as e:
            error = e
    if not everyone(accelerator, error is None):
        failure = _write_error(run_dir, final, tmp, error)  # before the space is freed
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure
    if main:
        _prune(run_dir, keep, final)
    accelerator.wait_for_everyone()
    return final


def _prune(run_dir: Path, keep: int, newest: Path) -> None:
    """Keep ``newest`` and the newest intact older ones, ``keep`` in all; remove the rest:
    damaged ones (a damaged checkpoint never stands in for an intact one) and any newer than
    ``newest`` (left by a run resumed from an older checkpoint)."""
    found = checkpoints(run_dir)
    if newest not in found:
        return
    older, newer = found[:found.index(newest)], found[found.index(newest) + 1:]
    kept = 1
    for path in reversed(older):
        if kept < keep:
            if is_intact(path):
                kept += 1
                continue
            warn(f"removing damaged checkpoint {path} ({damage(path)})")
        _remove(path)
    for path in newer:
        warn(f"removing checkpoint {path}: this run continued from the earlier {newest.name}")
        _remove(path)


def _remove(path: Path) -> None:
    intact.discard(path)
    shutil.rmtree(path, ignore_errors=True)


def _write_error(run_dir: Path, final: Path, tmp: Path,
                 error: Exception | None) -> CheckpointWriteError:
    previous = [c for c in checkpoints(run_dir) if c != final and is_intact(c)]
    kept = (f"the last checkpoint, {previous[-1]}, is intact" if previous
            else "no checkpoint was written before")
    return CheckpointWriteError(f"could not write checkpoint {final}: {_reason(error, tmp)}; "
                                f"the run stopped and {kept}; free space or make {run_dir} "
                                "writable, then resume")


def _reason(error: Exception | None, tmp: Path) -> str:
    """The cause in words: the OS error and its file, else the library's first line, with the
    errno it quotes read out (safetensors: "... (os error 28)") or the space left on the disk
    (torch.save says only "unexpected pos ...")."""
    if error is None:
        return "another process could not write its part"
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({error.filename or tmp})"
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    quoted = re.search(r"os error (\d+)", text)
    if quoted:
        return f"{os.strerror(int(quoted[1]))} (writing {tmp})"
    try:
        free = f"; {shutil.disk_usage(tmp.parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return f"{text} (writing {tmp}{free})"


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore Accelerate's state from ``path``; return our counters."""
    accelerator.load_state(str(path))
    return json.loads((path / COUNTERS).read_text())
