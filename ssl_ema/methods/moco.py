"""MoCo v2 (He et al., CVPR 2020; Chen et al. 2020, arXiv:2003.04297) with lightly's head and loss.

student (the paper's query encoder): backbone -> MoCo projection head (2-layer MLP);
teacher (key encoder): EMA of both. Each view's query is classified against the teacher's key of
the other view (positive) and a queue of earlier teacher keys (negatives) with InfoNCE at
temperature ``moco.temperature``: lightly's `NTXentLoss` with a memory bank, symmetrised over the
two views as lightly's CIFAR-10 benchmark and the official CIFAR demo do.

The queue is stated in samples (``moco.queue_size`` keys, one per image: the teacher's key of the
second view) and is a ring buffer that always holds the keys of the last ``queue_size`` images,
whatever the batch: a batch-size change (progressive scaling, another device count) keeps the
negatives' horizon in samples, as the EMA Scaling Rule keeps the teacher's (Busbridge et al. 2023).
lightly's own bank cannot: it drops the part of a batch that would wrap around (so its content
depends on the batch) and is not saved in checkpoints (so a resume changes it). Both directions
of the loss see the queue as it was before the step; then the step's keys are pushed (lightly's
benchmark pushes after the first direction, so the second sees its own batch's keys as negatives).
Under several processes every rank pushes the keys of the whole global batch (MoCo's
concat_all_gather), so all ranks hold the same queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from torch import nn

from ssl_ema.config_schema import Config
from ssl_ema.data.batch import Views
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.moco_spec import MoCoConfig
from ssl_ema.models.backbones import backbone_from_config


class KeyQueue(nn.Module):
    """Ring buffer of the last ``size`` teacher keys, (size, dim), L2-normalised.

    It stands in for lightly's `MemoryBankModule` inside `NTXentLoss` (same ``forward``: returns
    the output and the bank as (dim, size)) but never updates there: `push` does, after the loss.
    Persistent buffers, so a checkpoint holds the queue and a resume continues it exactly.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = (size, dim)  # read by NTXentLoss as memory_bank.size
        # Random unit vectors until real keys replace them (MoCo and lightly alike).
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.int64))  # keys seen

    def forward(self, output: torch.Tensor, labels: Any = None, update: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return output, self.keys.detach().clone().T  # (dim, size)

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue (n, dim) keys, overwriting the oldest; n > size keeps the last size of them."""
        keys = F.normalize(keys.detach().float(), dim=1)[-self.size[0]:]
        n, size = len(keys), self.size[0]
        index = (self.pointer + torch.arange(n, device=keys.device)) % size  # no host sync
        self.keys.index_copy_(0, index, keys.to(self.keys.dtype))
        self.pointer.copy_((self.pointer + n) % size)
        self.pushed += n

    def newest_first(self) -> torch.Tensor:
        """The queue from the newest key to the oldest, (size, dim)."""
        order = (self.pointer - 1 - torch.arange(self.size[0], device=self.keys.device))
        return self.keys[order % self.size[0]]


def _gather(keys: torch.Tensor) -> torch.Tensor:
    """Keys of every process in rank order (the global batch), or ``keys`` with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())  # NCCL and gloo alike
    return torch.cat(parts)


class MoCo(TeacherStudentMethod):
    def __init__(self, cfg: Config, in_chans: int, num_classes: int = 0):
        mc = cfg.section(MoCoConfig)

        def build() -> dict[str, nn.Module]:
            backbone = backbone_from_config(cfg, in_chans)
            return {"backbone": backbone,
                    "projection": MoCoProjectionHead(backbone.num_features, mc.hidden_dim,
                                                     mc.output_dim)}

        super().__init__(cfg, build, teacher_keys=["backbone", "projection"])
        self.criterion = NTXentLoss(temperature=mc.temperature,
                                    memory_bank_size=(mc.queue_size, mc.output_dim))
        self.criterion.memory_bank = KeyQueue(mc.queue_size, mc.output_dim)

    @property
    def queue(self) -> KeyQueue:
        return self.criterion.memory_bank  # type: ignore[return-value]

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        return self.student["projection"](self.student["backbone"](x))

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher["projection"](self.teacher["backbone"](x))

    def forward(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        view0, view1 = Views.of(batch).views  # (B, C, H, W) each
        q0, q1 = self._student(view0), self._student(view1)  # (B, D) queries
        k0, k1 = self._teacher(view0), self._teacher(view1)  # (B, D) keys, no graph
        loss = 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        if self.training:
            self.queue.push(_gather(k1))
        return {"loss": loss}
