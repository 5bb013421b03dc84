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
changed byte); :func:`newest_intact` is the one place that picks a run's checkpoint, for a
resume and for the tools that read a run (eval, export, transfer) alike: the newest intact one,
with a warning line for each damaged newer one. Only intact checkpoints count towards
``train.keep_checkpoints``. Folders in ``checkpoints/`` that are not named ``step_NNNNNNNN``
(``step_00000017.bak``, a file manager's ``step_00000017 (copy)``) are ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from ssl_ema.config import ConfigError
from ssl_ema.engine.fsync import fsync

PREFIX = "step_"
COUNTERS = "counters.json"
MANIFEST = "manifest.json"
TMP = ".tmp-"  # a save in progress (or interrupted): never a checkpoint
NAME = re.compile(rf"{PREFIX}(\d+)")
# What a failed write raises: OSError from Python's own writes, SafetensorError (safetensors,
# the model) and RuntimeError (torch.save's "PytorchStreamWriter failed writing file") from
# the libraries', which report a full disk without an errno.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)
_warned: set[str] = set()  # warnings this process has given (a tool may look twice)
_intact: set[Path] = set()  # checkpoints this process sealed or verified by checksum


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the path and the last good one."""


def warn(message: str) -> None:
    """One warning line on stderr, from the first process only, once per process."""
    if int(os.environ.get("RANK", "0")) == 0 and message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run (renamed into place, not yet verified), oldest first. Other folders
    in ``checkpoints/`` are ignored, with one warning each per process."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
        elif not path.name.startswith(TMP):
            warn(f"ignoring {path}: not a checkpoint (those are folders named "
                 f"{PREFIX}NNNNNNNN)")
    return [path for _, path in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()



def _seal(folder: Path) -> None:
    """fsync every file of ``folder``, then write (and fsync) its manifest, last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync(path)
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size,
                                                "sha256": _sha256(path)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    fsync(manifest)
    fsync(folder)


def damage(path: Path, hashes: bool = True) -> str | None:
    """What is wrong with the checkpoint at ``path`` compared with its manifest, or None;
    without ``hashes`` only the files' presence and sizes are checked."""
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
        if hashes and _sha256(file) != want["sha256"]:
            return f"{name} differs from its checksum in the manifest"
    return None


def _everyone(accelerator: Accelerator, ok: bool) -> bool:
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
    if _everyone(accelerator, error is None) and main:
        try:
            (tmp / COUNTERS).write_text(json.dumps(counters))
            for name, contents in (files or {}).items():
                (tmp / name).write_bytes(contents)
            _seal(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync(folder)
            _intact.add(final)
        except OSError as e:
            error = e
    if not _everyone(accelerator, error is None):
        failure = _write_error(run_dir, final, tmp, error)  # before the space is freed
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure
    if main:
        _prune(run_dir, keep, final)
    accelerator.wait_for_everyone()
    return final


def _is_intact(path: Path) -> bool:
    """Checked against the manifest: by checksum once per process (or not at all when this
    process sealed it), then by file sizes, which catch the usual damage (a truncated or
    missing file) without reading gigabytes at every save."""
    if path in _intact:
        return damage(path, hashes=False) is None
    if damage(path) is None:
        _intact.add(path)
        return True
    return False


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
            if _is_intact(path):
                kept += 1
                continue
            warn(f"removing damaged checkpoint {path} ({damage(path)})")
        _remove(path)
    for path in newer:
        warn(f"removing checkpoint {path}: this run continued from the earlier {newest.name}")
        _remove(path)


def _remove(path: Path) -> None:
    _intact.discard(path)
    shutil.rmtree(path, ignore_errors=True)


def newest_intact(run_dir: Path, prefix: str = "") -> Path:
    """The newest checkpoint of ``run_dir`` that matches its manifest, with a warning line for
    each damaged newer one; ConfigError (its message starting with ``prefix``) if none."""
    found = checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{prefix}no checkpoint under '{run_dir}/checkpoints'; pass a run "
                          "directory written by tools/train.py or one of its "
                          "checkpoints/step_* folders")
    damaged = []
    for checkpoint in reversed(found):
        problem = damage(checkpoint)
        if problem is None:
            _intact.add(checkpoint)
            return checkpoint
        damaged.append(f"{checkpoint.name}: {problem}")
        warn(f"checkpoint {checkpoint} is damaged ({problem}); trying the one before it")
    raise ConfigError(f"{prefix}no intact checkpoint under '{run_dir}/checkpoints' "
                      f"({'; '.join(damaged)}); start a new run")


def verified(checkpoint: Path, prefix: str = "") -> Path:
    """``checkpoint`` itself, named by the user: ConfigError if it is damaged (no fall-back)."""
    problem = damage(checkpoint)
    if problem:
        raise ConfigError(f"{prefix}checkpoint '{checkpoint}' is damaged ({problem}); pass the "
                          "run directory to use its newest intact checkpoint")
    return checkpoint


def is_checkpoint_path(path: Path) -> bool:
    """Does ``path`` name one checkpoint (``RUN/checkpoints/step_NNNNNNNN``)?"""
    return NAME.fullmatch(path.name) is not None and path.parent.name == "checkpoints"


def _write_error(run_dir: Path, final: Path, tmp: Path,
                 error: Exception | None) -> CheckpointWriteError:
    previous = [c for c in checkpoints(run_dir) if c != final and _is_intact(c)]
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
