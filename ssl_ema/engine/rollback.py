"""Undoing a step (or an evaluation) in flight: what it changes before anything is committed.

A stop signal in the middle of a long step abandons the step (one process, `engine/stop.py`),
and a step whose loss is not finite is dropped (``train.nonfinite=skip``). Either way its forward
passes have already moved things a checkpoint holds: the BatchNorm running statistics of student
and teachers (and DINO's centre, MoCo's queue: every buffer of the method), the random number
generators (dropout, drop-path; each data loader iterator draws its base seed), and Accelerate's
micro-batch counter, which decides when gradients are synchronised. A checkpoint written after
that is not the state after the last completed step, and a resume from it is not the
uninterrupted run (a skipped step with a non-finite loss also leaves non-finite statistics
behind). So the trainer marks that state when a step (or evaluation) starts and rolls back to
it: the buffers (one foreach copy), and when a stop may interrupt the step also the generators
and the counter; the gradients, not in a checkpoint, are zeroed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import get_torch_accelerator_backend
from torch import nn
from torch.optim import Optimizer

from ssl_ema.engine.guard import NonFiniteGuard
from ssl_ema.engine.stop import Interrupted, StopSignals


class Generators:
    """The random generators Accelerate saves in a checkpoint (accelerate/checkpointing.py):
    Python's, NumPy's, torch's CPU one and the accelerator's (all devices)."""

    def __init__(self) -> None:
        device_type, _ = get_torch_accelerator_backend()
        self.device = None if device_type is None else torch.get_device_module(device_type)

    def states(self) -> dict[str, Any]:
        states: dict[str, Any] = {"random": random.getstate(), "numpy": np.random.get_state(),
                                  "torch": torch.get_rng_state()}
        if self.device is not None:  # host-side seeds and offsets: no device sync
            states["device"] = (self.device.get_rng_state_all()
                                if hasattr(self.device, "get_rng_state_all")
                                else self.device.get_rng_state())
        return states

    def set_states(self, states: dict[str, Any]) -> None:
        random.setstate(states["random"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        if self.device is not None:
            if isinstance(states["device"], list):
                self.device.set_rng_state_all(states["device"])
            else:
                self.device.set_rng_state(states["device"])


class Rollback:
    """What a step (or evaluation) changes before it commits, as it was at `mark`: the buffers of
    ``module`` (by name: a method may re-assign one), what ``guard`` has observed and, with
    ``interrupt`` (a stop may interrupt the step), the random generators and Accelerate's
    micro-batch counter. Marks nothing when neither ``interrupt`` nor ``skip`` needs it."""

    def __init__(self, module: nn.Module, accelerator: Accelerator, guard: NonFiniteGuard,
                 optimizer: Optimizer, interrupt: bool):
        self.module, self.accelerator, self.guard, self.optimizer = (module, accelerator, guard,
                                                                     optimizer)
        self.active = interrupt or not guard.deferred
        self._saved: dict[str, torch.Tensor] = {}
        self._generators = Generators() if interrupt else None
        self._rng: dict[str, Any] | None = None
        self._step, self._observed = 0, guard.state()

    def mark(self) -> None:
        if not self.active:
            return
        names, buffers = _named_buffers(self.module)
        if names == list(self._saved):
            if buffers:
                torch._foreach_copy_(list(self._saved.values()), buffers)
        else:  # the first mark (or the method re-registered a buffer)
            self._saved = {n: b.detach().clone() for n, b in zip(names, buffers)}
        self._observed = self.guard.state()
        if self._generators is not None:
            self._rng, self._step = self._generators.states(), self.accelerator.step

    def restore_buffers(self) -> None:
        """The buffers as at the last `mark` (a step dropped for a non-finite loss)."""
        names, buffers = _named_buffers(self.module)
        if buffers:
            torch._foreach_copy_(buffers, [self._saved[n] for n in names])

    def restore(self) -> None:
        """Everything as at the last `mark` (an interrupted step), the gradients zeroed."""
        self.restore_buffers()
        self.guard.restore(self._observed)
        self.optimizer.zero_grad(set_to_none=True)
        if self._generators is not None and self._rng is not None:
            self._generators.set_states(self._rng)
            self.accelerator.step = self._step


class InFlight:
    """The step or evaluation in flight: `begin` marks what it will change and lets a stop
    signal interrupt it (one process, `StopSignals.arm`) until `commit`; inside `interruptible`
    an interruption is rolled back and handed to ``stop`` (which checkpoints and stops)."""

    def __init__(self, signals: StopSignals, rollback: Rollback):
        self.signals, self.rollback = signals, rollback
        on_cpu = all(p.device.type == "cpu" for p in rollback.module.parameters())
        if signals.interrupt and on_cpu:  # on an accelerator the backward runs in its threads
            interruptible_backward(rollback.module)

    def begin(self) -> None:
        self.rollback.mark()
        self.signals.arm()

    def commit(self) -> None:
        self.signals.disarm()

    @contextlib.contextmanager
    def interruptible(self, stop: Callable[[int], None]) -> Iterator[None]:
        try:
            yield
        except Interrupted as e:
            self.rollback.restore()
            stop(e.signum)
        finally:
            self.signals.disarm()


def _named_buffers(module: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    pairs = list(module.named_buffers())
    return [n for n, _ in pairs], [b for _, b in pairs]


def interruptible_backward(module: nn.Module) -> None:
    """Let a signal handler run during the backward pass, between parameters: on the CPU the
    autograd engine runs it in the calling thread without returning to Python, so a handler
    (and the stop it raises) would wait for the whole backward. A hook on each parameter's
    gradient is a Python call; it changes nothing (returns None)."""
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(_poll)


def _poll(grad: torch.Tensor) -> None:
    return None
