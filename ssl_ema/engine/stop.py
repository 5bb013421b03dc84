"""Stopping a run without losing work: signals, a deadline and wall-clock checkpoints, agreed by
every rank.

SIGTERM (a cluster pre-empting the job), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's ``--signal``)
set a flag; the trainer reads it at optimizer-step boundaries, writes a checkpoint and stops
with :class:`Stopped` (exit code 128 + the signal's number, as a shell reports a process killed
by that signal). A step can outlast the grace a launcher gives after its SIGTERM (``accelerate
launch``: 5 s, then SIGKILL; torchrun: 30 s; SLURM: ``KillWait``), so with one process a signal
also interrupts the step (or evaluation) in flight: between `StopSignals.arm` and ``disarm`` the
handler raises :class:`Interrupted`, and the trainer rolls the step back (`engine/rollback.py`)
and checkpoints the last completed one. With several processes a rank cannot leave a step alone
(the others would wait in its collectives), so the step finishes. A second signal while the
first is being handled (a second or more later) stops at once, without a checkpoint, for a user
who does not want to wait. A deadline (``tools/train.py --stop-after``, a budgeted run of
``tools/reproduce.py``) stops the same way with exit code 3: a budget is a pre-emption the run
knows about in advance.

Several processes must stop at the same step (a checkpoint is a collective save), and so must
they agree on when a wall-clock checkpoint is due (their clocks differ). The local flags are
all-reduced (max) at log points only, every ``train.log_every`` steps, where the trainer
already reads the loss back to the host: the all-reduce adds a collective but no extra host sync
to the step. With one process the flags are read at every step (a Python attribute, no sync).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # torch only for several processes: tools import this module before it
    import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# A launcher's death arrives as several SIGTERMs at once: Linux sends the PR_SET_PDEATHSIG
# signal once per thread that inherited the setting (prctl(2); kernel/exit.c, reparent_leader),
# and torch's threads inherit it. Only a signal this long after the first is a user's second.
REPEAT_AFTER_S = 1.0


DEADLINE_EXIT = 3  # --stop-after: distinct from 128 + N, so a budget runner knows it was its own


class Stopped(RuntimeError):
    """The run stopped on a signal or at its deadline after writing a checkpoint; ``code`` is
    the exit code (128 + the signal's number, or ``DEADLINE_EXIT``)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code

    @classmethod
    def at(cls, signum: int, step: int, epoch: int, checkpoint: Path, run_dir: Path) -> Stopped:
        """Stopped by signal ``signum`` (0: the deadline) at ``step``, after ``checkpoint``."""
        cause = signal_name(signum) if signum else "the --stop-after deadline"
        return cls(f"stopped by {cause} at step {step} (epoch {epoch}), checkpoint written to "
                   f"{checkpoint}; continue with: tools/train.py --resume {run_dir}",
                   128 + signum if signum else DEADLINE_EXIT)


class Interrupted(BaseException):
    """A stop signal arrived inside an armed region (`StopSignals.arm`): the work in flight is
    abandoned. A BaseException, as KeyboardInterrupt, so that no ``except Exception`` on the way
    out of a forward pass or a data loader swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Context manager: while inside, the stop signals set `received` instead of killing the
    process; the previous handlers come back on exit. Only the main thread can install them.
    ``interrupt``: a signal inside an armed region also raises :class:`Interrupted`."""

    def __init__(self, interrupt: bool = False) -> None:
        self.received = 0  # signal number, 0 while none arrived
        self.interrupt = interrupt
        self._armed = False
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def arm(self) -> None:
        """From now until `disarm`, a stop signal raises :class:`Interrupted` (with
        ``interrupt``); one that arrived before raises now. The caller can undo what happens in
        between (`engine/rollback.py`)."""
        if not self.interrupt:
            return
        if self.received:
            raise Interrupted(self.received)
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._received_at = signum, now
            if self._armed:
                self._armed = False
                raise Interrupted(signum)
        elif now - self._received_at >= REPEAT_AFTER_S:
            os._exit(128 + signum)  # the second signal: stop now (a handler must not print)


class StopPoints:
    """At an optimizer-step boundary: has a signal arrived, has the deadline ``stop_at`` (on
    the monotonic clock) passed, or is a wall-clock checkpoint due, on any process? See the
    module docstring for when the processes compare their flags."""

    def __init__(self, signals: StopSignals, every_minutes: float, check_every: int,
                 all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None,
                 device: torch.device, stop_at: float | None = None):
        self.signals, self.check_every, self.stop_at = signals, check_every, stop_at
        self.every_s = every_minutes * 60.0
        self._all_reduce_max, self._device = all_reduce_max, device
        self.saved()

    def saved(self) -> None:
        """A checkpoint was written now: the wall clock restarts."""
        self._last_save = time.monotonic()

    def check(self, step: int) -> tuple[int, bool, bool]:
        """(signal number or 0, whether the deadline passed, whether a wall-clock checkpoint is
        due) after ``step``."""
        signum, now = self.signals.received, time.monotonic()
        late = self.stop_at is not None and now >= self.stop_at
        due = bool(self.every_s) and now - self._last_save >= self.every_s
        if self._all_reduce_max is None:
            return signum, late, due
        if step % self.check_every:
            return 0, False, False
        import torch

        flags = torch.tensor([signum, int(late), int(due)], device=self._device)
        signum, late_any, due_any = self._all_reduce_max(flags).tolist()
        return int(signum), bool(late_any), bool(due_any)


def stop_with_launcher() -> None:
    """Under a launcher (``accelerate launch``, ``torchrun``), have Linux send this process
    SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so a killed launcher's trainer
    checkpoints and stops instead of training on, orphaned, beside a resumed run. Not for
    ``python tools/train.py`` itself: there the parent is the user's shell, and ``nohup`` must
    keep working after it exits. Other systems: nothing (the launcher's own handling applies)."""
    launched = "ACCELERATE_USE_CPU" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the call: it will never fire
        os.kill(os.getpid(), signal.SIGTERM)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` after a stop (checkpoint written, lock released, trackers
    closed), skipping the interpreter's teardown: unloading torch and its modules takes a second
    or more, and a launcher's grace after its SIGTERM is short (``accelerate launch``: 5 s).
    Loader workers end as at a normal exit (multiprocessing terminates daemonic children)."""
    for child in multiprocessing.active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
