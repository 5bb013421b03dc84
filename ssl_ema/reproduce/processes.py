"""The runs of a study as processes: each started, stopped at its deadline or on Ctrl-C, and
several at once (``Slots``): a CPU study runs one torch thread a run, so a machine with N
cores trains N runs in the time of one.

``run_process`` stops a run with SIGTERM past its deadline (it checkpoints), SIGKILL after the
grace; Ctrl-C stops the runs in progress with a checkpoint and waits for them, so that their
time is booked and a run that finished meanwhile is stored, before KeyboardInterrupt goes on.
"""

from __future__ import annotations

import heapq
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]  # where the runs start: tools/, recipes/
GRACE_S = 60.0  # after the budget: SIGTERM (a checkpoint), then SIGKILL
CHILDREN: set[subprocess.Popen[bytes]] = set()  # the runs in progress (Ctrl-C stops them)
INTERRUPTED = 130  # a run stopped by Ctrl-C: 128 + SIGINT, as a shell reports it


def run_process(cmd: list[str], env: dict[str, str], timeout_s: float,
                grace_s: float = GRACE_S) -> int:
    """Run ``cmd``; past ``timeout_s`` send SIGTERM (a checkpoint), and SIGKILL
    ``grace_s`` later. Interrupted here (Ctrl-C in this thread): the run is stopped with a
    checkpoint and waited for before KeyboardInterrupt goes on."""
    proc = subprocess.Popen(cmd, env=env, cwd=CHECKOUT)
    CHILDREN.add(proc)
    try:
        try:
            return proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # if the Ctrl-C reached it too, the same stop
        _wait_out(proc)
        raise
    finally:
        CHILDREN.discard(proc)


def _wait_out(proc: subprocess.Popen[bytes]) -> None:
    """Wait for ``proc`` to exit; a further Ctrl-C reaches it too (it stops at once)."""
    while True:
        try:
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def makespan(seconds: Sequence[float], jobs: int) -> float:
    """Wall seconds for runs of these lengths, in this order, ``jobs`` at a time (each starts
    when the first slot frees, as ``spend`` starts them)."""
    slots = [0.0] * max(1, jobs)
    for s in seconds:
        heapq.heapreplace(slots, slots[0] + s)
    return max(slots)


class Slots:
    """Up to ``size`` runs at once, each a thread that waits on its subprocess. With one slot
    the run happens in the calling thread: a run started in-process (as the tests do) installs
    signal handlers, which only the main thread may."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"jobs: {size}; at least one run at a time")
        self.size = size
        self.pool = ThreadPoolExecutor(size) if size > 1 else None
        self.running: dict[Future[int], tuple[Any, ...]] = {}

    def start(self, tag: tuple[Any, ...], fn: Callable[..., int],
              *args: object) -> None:
        if self.pool is None:
            done: Future[int] = Future()
            self.running[done] = tag
            try:
                done.set_result(fn(*args))
            except KeyboardInterrupt:  # fn stopped its run before raising
                done.set_result(INTERRUPTED)
                raise
        else:
            self.running[self.pool.submit(fn, *args)] = tag

    @contextmanager
    def interruptible(self, finish: Callable[..., None]) -> Iterator[None]:
        """On Ctrl-C: stop the runs with a checkpoint and wait for them (their time is booked,
        a run that finished meanwhile stored), then raise KeyboardInterrupt. Ctrl-C reaches
        the runs too (one process group); a SIGINT sent to this process alone is passed on
        (a run takes a second signal within a second of the first as the same one)."""
        try:
            yield
        except KeyboardInterrupt:
            for child in list(CHILDREN):
                child.send_signal(signal.SIGINT)
            while True:
                try:
                    self.wait_until(0, finish)
                    break
                except KeyboardInterrupt:  # a second Ctrl-C: the runs stop at once
                    continue
            raise

    def wait_until(self, running: int, finish: Callable[..., None]) -> None:
        """Return once at most ``running`` runs are in progress, finishing each run that has
        ended, as it ends."""
        while len(self.running) > running:
            wait(self.running, return_when=FIRST_COMPLETED)
            for future in [f for f in self.running if f.done()]:
                finish(*self.running.pop(future), future.result())

    def drain(self, finish: Callable[..., None]) -> None:
        self.wait_until(0, finish)
        if self.pool is not None:
            self.pool.shutdown()
