"""JSON files the reproduction suite keeps (study records, a run's wall time): written whole or
not at all, read without ever losing one.

Writing goes through a temporary file in the same folder, fsynced, then renamed over the old
file (a rename within one filesystem is atomic), so a process killed at any moment, SIGKILL
included, leaves either the old file or the new one. A file that is damaged anyway (truncated
by a full disk, edited by hand, copied half-way) is set aside under a name of its own with one
warning line, and reading carries on as if it were absent: never a traceback on every later
command, never silently lost.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DAMAGED = ".damaged-"  # <name>.damaged-<UTC time>: a damaged file set aside


def write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(json.dumps(obj, indent=indent) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a directory's entries reach the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``; None if there is none, or if it is damaged (not JSON, or
    not an object): then it is renamed to ``<name>.damaged-<time>`` beside it and one warning
    line says so."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
        why = "" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
    if not why:
        return obj
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}{DAMAGED}{stamp}"), 1
    while aside.exists():  # never over an earlier one
        aside, n = path.with_name(f"{path.name}{DAMAGED}{stamp}-{n}"), n + 1
    path.replace(aside)
    print(f"warning: {path} is damaged ({why}, {len(data)} bytes); set aside as {aside.name} "
          "and read as absent", file=sys.stderr)
    return None
