"""The files of a run directory, read: its checkpoints and their manifests, its resolved
``config.yaml``, what its ``header.json`` says was given from Python.

Below the engine (which writes these files: `ssl_ema.engine.checkpoint`,
`ssl_ema.engine.header`) and the evaluation (which reads finished runs: `ssl_ema.eval.trained`).
:func:`damage` compares a checkpoint's files with its manifest (a missing or truncated file, a
changed byte); :func:`newest_intact` is the one place that picks a run's checkpoint, for a resume
and for the tools that read a run (eval, export, transfer) alike: the newest intact one, with a
warning line for each damaged newer one. Folders in ``checkpoints/`` that are not named
``step_NNNNNNNN`` (``step_00000017.bak``, a file manager's ``step_00000017 (copy)``) are ignored
with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ssl_ema.config import ConfigError, _yaml_problem

PREFIX = "step_"
COUNTERS = "counters.json"
MANIFEST = "manifest.json"
TMP = ".tmp-"  # a save in progress (or interrupted): never a checkpoint
NAME = re.compile(rf"{PREFIX}(\d+)")
_warned: set[str] = set()  # warnings this process has given (a tool may look twice)
intact: set[Path] = set()  # checkpoints this process sealed or verified by checksum


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
        if hashes and sha256(file) != want["sha256"]:
            return f"{name} differs from its checksum in the manifest"
    return None


def is_intact(path: Path) -> bool:
    """Checked against the manifest: by checksum once per process (or not at all when this
    process sealed it), then by file sizes, which catch the usual damage (a truncated or
    missing file) without reading gigabytes at every save."""
    if path in intact:
        return damage(path, hashes=False) is None
    if damage(path) is None:
        intact.add(path)
        return True
    return False


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
            intact.add(checkpoint)
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


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as written when it started; ConfigError (one line)
    if it is missing or damaged: without it the run cannot be rebuilt."""
    path = run_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"'{path}' is missing: without the run's resolved config it cannot be "
                          "rebuilt; restore the file, or start a new run") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        problem = _yaml_problem(e) if isinstance(e, yaml.YAMLError) else f": {e}"
        raise ConfigError(f"'{path}' is damaged (not readable YAML{problem}); restore the file, "
                          "or start a new run") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"'{path}' is damaged (a {type(saved).__name__}, not a mapping of "
                          "sections); restore the file, or start a new run")
    return saved


def given_objects(run_dir: Path) -> dict[str, str]:
    """What a run trained on that was given from Python (``train_set``, ``test_set``,
    ``backbone``: their classes), from its header.json; empty for a recipe's run.
    ConfigError (one line) if header.json is damaged."""
    header = run_dir / "header.json"
    if not header.is_file():
        return {}
    try:
        given = json.loads(header.read_text()).get("given", {})
        return {str(k): str(v) for k, v in given.items()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ConfigError(f"'{header}' is damaged ({e}); it says whether the run trained on "
                          "objects given from Python: restore it, or delete it if the run "
                          "trained from a recipe (tools/train.py writes it again)") from None
