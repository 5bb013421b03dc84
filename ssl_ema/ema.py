"""EMA teachers: teacher <- momentum * teacher + (1 - momentum) * student.

One :class:`EMA` keeps any number of teachers averaging the same student, each at its own
momentum (Morales-Brotons, Vogels, Hendrikx, TMLR 2024, track five in parallel). It runs once per
optimizer step or every ``period`` steps (never per micro-batch: under gradient accumulation a
per-micro-batch update silently shortens the averaging horizon), on unwrapped modules, so every
process applies the same update to the same student and all ranks stay identical.

Momenta are always stated *per optimizer step at the reference batch*; `ssl_ema.momentum` turns
one into the momentum of one update (schedule, warm-up, ``** (kappa * period)``: the EMA Scaling
Rule, Busbridge et al. 2023); :meth:`EMA.update` takes that value as it is.

The update is ``torch._foreach_lerp_``: one fused multi-tensor kernel per teacher that reads the
student and the teacher once and writes the teacher once, instead of a foreach mul_ then add_
(two passes over the teacher: lightly 1.6's ``update_momentum``) or a ``state_dict()`` rebuilt at
every update (timm ModelEmaV3). Measured against both by ``tools/bench_ema.py``.
Teachers may be kept in fp32 while the student is bf16/fp16; the student is upcast on the fly.

With several teachers, per-teacher kernels read the student once per teacher: 3K passes where
1 + 2K suffice (1.36x the floor at K = 5). ``fused=True`` stores the teachers' parameters in flat
buffers, copies the student into one flat staging buffer, and updates every teacher with one
``torch.compile``d kernel that reads the student once: (3 + 2K) passes, 1.18x the floor at K = 5.
It needs torch.compile (Triton on GPU, a C++ compiler on CPU) and pays a one-off compilation.
The kernel rounds as torch's own ``lerp_`` does (one fused multiply-add), so fused and per-teacher
updates give the same teachers bit for bit. A state dict of such a teacher holds copies of its
parameters, not views of the flat buffer: Accelerate and safetensors drop or refuse tensors that
share storage, which lost the teacher from checkpoints.

Buffer policy (BatchNorm running statistics), chosen explicitly:
- ``own``:     the teacher keeps the statistics its own forward passes accumulate (BYOL, lightly).
- ``copy``:    the teacher's buffers are copied from the student at every update.
- ``average``: floating buffers are averaged like the weights (same momentum); integer buffers
               (``num_batches_tracked``) are copied. The slowest EMAs of the paper fail this way
               unless their statistics are recomputed: see :func:`recompute_batchnorm`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

BufferPolicy = Literal["own", "copy", "average"]
BUFFER_POLICIES: tuple[str, ...] = ("own", "copy", "average")


def _multi_lerp(student: torch.Tensor, teachers: list[torch.Tensor], weights: torch.Tensor) -> None:
    # Compiled into one kernel: every teacher element reads the same student element once.
    for i, teacher in enumerate(teachers):
        teacher.lerp_(student, weights[i])


def _compiled_multi_lerp() -> Callable[..., None]:
    from torch._inductor import config

    # ATen's lerp computes t + w (s - t) with one rounding (a fused multiply-add; Triton fuses
    # by default too); inductor's C++ code rounds twice unless told to contract the two.
    options = {"cpp.enable_floating_point_contract_flag": "fast"} \
        if hasattr(config.cpp, "enable_floating_point_contract_flag") else None
    return torch.compile(_multi_lerp, fullgraph=True, dynamic=False, options=options)


def _own_storage(module: nn.Module, state: dict[str, Any], prefix: str, _: Any) -> None:
    """State-dict post-hook of a fused teacher: its parameters as copies with storage of their
    own (views of one flat buffer are dropped or refused by Accelerate's safetensors save and
    load). Loading still copies into the views."""
    for name, _p in module.named_parameters():
        key = prefix + name
        if key in state:
            state[key] = state[key].clone()


def _flat_views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


class _FusedUpdate:
    """Teachers' parameters re-homed into flat buffers; one compiled kernel updates them all."""

    @torch.no_grad()
    def __init__(self, student: list[torch.Tensor], teachers: list[list[torch.Tensor]]):
        first = teachers[0][0]
        if any(p.dtype != first.dtype or p.device != first.device
               for params in teachers for p in params):
            raise ValueError("fused EMA needs all teacher parameters on one device in one dtype")
        n = sum(p.numel() for p in student)
        self.student = student
        # The student is copied (and upcast) into one staging buffer: 2 passes, then 1 read.
        self.staging = torch.empty(n, dtype=first.dtype, device=first.device)
        self.staging_views = _flat_views(self.staging, student)
        self.flats = []
        for params in teachers:
            flat = torch.empty(n, dtype=first.dtype, device=first.device)
            for view, p in zip(_flat_views(flat, params), params):
                view.copy_(p)
                p.data = view  # the module keeps its Parameter objects; storage is now flat
            self.flats.append(flat)
        self.kernel = _compiled_multi_lerp()

    def __call__(self, weights: Sequence[float]) -> None:
        torch._foreach_copy_(self.staging_views, self.student)
        w = torch.tensor(list(weights), dtype=self.staging.dtype, device=self.staging.device)
        self.kernel(self.staging, self.flats, w)


def _tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return list(module.parameters()), list(module.buffers())


def _check_same_structure(teacher: nn.Module, student: nn.Module) -> None:
    for kind, t_list, s_list in zip(("parameters", "buffers"), _tensors(teacher),
                                    _tensors(student)):
        if len(t_list) != len(s_list) or any(t.shape != s.shape for t, s in zip(t_list, s_list)):
            raise ValueError(f"teacher and student must have the same {kind} in the same order")


class EMA:
    """Keeps each of ``teachers`` an exponential moving average of ``student``.

    All modules must have the same structure; teachers are built separately and loaded from the
    student (see `methods.base`), not deep-copied. Call :meth:`update` with one momentum per
    teacher (the momentum of this update: `ssl_ema.momentum.MomentumRule.per_update`).
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module],
                 buffers: BufferPolicy = "own", fused: bool = False):
        if buffers not in BUFFER_POLICIES:
            valid = ", ".join(BUFFER_POLICIES)
            raise ValueError(f"unknown buffer policy '{buffers}'; valid: {valid}")
        if not teachers:
            raise ValueError("EMA needs at least one teacher")
        for teacher in teachers:
            _check_same_structure(teacher, student)
        self.student, self.teachers, self.buffers = student, list(teachers), buffers
        s_params, s_buffers = _tensors(student)
        self._student_params = s_params
        self._float_buffers = [b for b in s_buffers if b.is_floating_point()]
        self._other_buffers = [b for b in s_buffers if not b.is_floating_point()]
        self._teacher_tensors = []
        for teacher in self.teachers:
            t_params, t_buffers = _tensors(teacher)
            self._teacher_tensors.append((
                t_params,
                [b for b in t_buffers if b.is_floating_point()],
                [b for b in t_buffers if not b.is_floating_point()],
            ))
        # Dtypes are fixed once built: decide here, not on every update (the hot path).
        self._upcast = [any(t.dtype != s.dtype for t, s in zip(tt[0], s_params))
                        for tt in self._teacher_tensors]
        self._fused = None
        if fused:
            self._fused = _FusedUpdate(s_params, [tt[0] for tt in self._teacher_tensors])
            for teacher in self.teachers:
                teacher.register_state_dict_post_hook(_own_storage)
        self.num_updates = 0

    @staticmethod
    def _lerp(teacher: list[torch.Tensor], student: list[torch.Tensor], weight: float,
              upcast: bool) -> None:
        if not teacher:
            return
        if upcast:  # fp32 teacher of a low-precision student: upcast the student on the fly
            student = [s.to(t.dtype) for t, s in zip(teacher, student)]
        # lerp_(s, w) computes t + w (s - t) = momentum t + (1 - momentum) s.
        torch._foreach_lerp_(teacher, student, weight)

    @torch.no_grad()
    def update(self, momenta: float | Sequence[float]) -> None:
        """One EMA update of every teacher, ``momenta[i]`` for teacher ``i``."""
        if isinstance(momenta, float | int):
            momenta = [float(momenta)] * len(self.teachers)
        if len(momenta) != len(self.teachers):
            raise ValueError(f"got {len(momenta)} momenta for {len(self.teachers)} teachers")
        if any(not 0.0 <= m <= 1.0 for m in momenta):
            raise ValueError(f"momentum must lie in [0, 1], got {list(momenta)}")
        if self._fused is not None:
            self._fused([1.0 - m for m in momenta])
        for momentum, upcast, (t_params, t_float, t_other) in zip(momenta, self._upcast,
                                                                  self._teacher_tensors):
            if self._fused is None:
                self._lerp(t_params, self._student_params, 1.0 - momentum, upcast)
            if self.buffers == "average":
                self._lerp(t_float, self._float_buffers, 1.0 - momentum, upcast)
            if self.buffers in ("average", "copy") and t_other:
                torch._foreach_copy_(t_other, self._other_buffers)
            if self.buffers == "copy" and t_float:
                torch._foreach_copy_(t_float, self._float_buffers)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        # Teacher weights live in their modules and are saved with them; the counter is ours.
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int | None,
                        device: torch.device | None = None,
                        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ) -> None:
    """Re-estimate BatchNorm running statistics of ``model`` on ``num_batches`` batches (None: all).

    An EMA of weights is a different network from any iterate, so neither the student's nor the
    averaged statistics match it; recomputing them helps and rescues the slowest EMAs
    (Morales-Brotons et al. 2024, Sec. 5). Uses torch's ``swa_utils.update_bn`` (a cumulative
    average over the batches; the first tensor of each batch is the input). Under DDP each rank
    sees its own shard: pass ``all_reduce_mean`` to combine, exactly for equal shard sizes,
    mean = E[mean_r] and var = E[var_r + mean_r^2] - mean^2.
    """
    update_bn(itertools.islice(batches, num_batches), model, device)
    if all_reduce_mean is None:
        return
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
            assert bn.running_var is not None
            mean = all_reduce_mean(bn.running_mean.clone())
            second = all_reduce_mean(bn.running_var + bn.running_mean**2)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(second - mean**2)
