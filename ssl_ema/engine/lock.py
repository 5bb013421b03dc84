"""One writer per run directory: ``<run dir>/.lock`` names its holder (host, pid, start time).

The exclusion itself is an advisory ``flock`` held on that file for the life of the run, so the
kernel releases it when the holder dies however it dies (SIGKILL included): a stale lock file
from a dead process is simply taken over, with no pid guessing. A second process is refused
with a one-line error naming the holder. With several processes, rank 0 takes the lock and tells
the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from ssl_ema.config import ConfigError

LOCK = ".lock"


class RunLock:
    """The lock on one run directory; `acquire` creates the directory if needed."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self._fd: int | None = None

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def acquire(self, new: bool = False) -> None:
        """Take the lock; ``new``: on a folder of its own, which `make_new_dir` creates."""
        if new:
            self.path = make_new_dir(self.run_dir) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(self._held_message()) from None
            try:  # the holder may have unlinked the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def _held_message(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            who = f"process {h['pid']} on {h['host']} (since {h['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        return (f"run directory {self.path.parent} is in use by {who}; one run directory has "
                f"one writer: wait for it to finish or stop it (lock file {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def make_new_dir(path: Path) -> Path:
    """Create ``path``, or ``path-2``, ``path-3``, ... where taken: a directory is created by
    exactly one caller (``mkdir`` without ``exist_ok`` is atomic), so runs started in the same
    second, a sweep's seeds, get a folder each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def lock_run_dir(run_dir: Path, state: PartialState, new: bool = False) -> RunLock:
    """Take the run directory's lock on rank 0; every rank raises ConfigError if it is held.
    ``new``: a new run, in ``run_dir`` or, if another run took it first, ``run_dir-N``
    (`make_new_dir`); the lock's ``run_dir`` is the folder every rank uses."""
    lock = RunLock(run_dir)
    shared: list[str | None] = [None, str(run_dir)]  # (error, run directory)
    if state.is_main_process:
        try:
            lock.acquire(new)
            shared[1] = str(lock.run_dir)
        except ConfigError as e:
            shared[0] = str(e)
        except OSError as e:
            shared[0] = (f"cannot create the run directory {run_dir}: {e.strerror or e}; set "
                         "run.output_dir to a writable folder")
    if state.num_processes > 1:
        broadcast_object_list(shared)
    if shared[0]:
        raise ConfigError(shared[0])
    lock.path = Path(str(shared[1])) / LOCK
    return lock
