"""DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021).

student: backbone -> DINO head (MLP, bottleneck, weight-normalised last layer); teacher: EMA of
both, with momentum cosine 0.996 -> 1 (Sec. 3.1). The student's softmax (temperature 0.1) over
all views regresses the teacher's centred, sharpened softmax (temperature warmed up 0.04 -> t)
over the two global views, every pair but a view with itself (lightly's DINOLoss, which follows
the official code). Multi-crop: global views are forwarded together, local views together.

The centre c <- m c + (1 - m) mean(teacher outputs) is an EMA stepped once per forward pass: its
momentum goes through the EMA Scaling Rule (``prepare_step``), like the teacher's.

Under mixed precision the loss runs in fp32 on fp32 copies of the outputs, as the official code's
does (its cross-entropy is an elementwise product and sum, which autocast keeps in fp32; lightly's
DINOLoss sums it with an einsum, which autocast runs in bf16: the loss then carried 8 significant
bits, docs/RESULTS.md, 'The GPU lease path'). Networks and heads keep the recipe's precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.heads import ProjectionHead
from torch import nn

from ssl_ema.config_schema import Config
from ssl_ema.data import gpu_augment, views
from ssl_ema.data.batch import Views
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.dino_spec import DINOConfig
from ssl_ema.models.backbones import backbone_from_config
from ssl_ema.momentum import MomentumRule


def dino_head(input_dim: int, d: DINOConfig) -> DINOProjectionHead:
    """lightly's DINO head with ``d.head_layers`` linear layers in its MLP, initialised as
    ``d.head_init`` says (the weight-normalised last layer keeps lightly's init either way)."""
    head = DINOProjectionHead(input_dim, d.hidden_dim, d.bottleneck_dim, d.output_dim,
                              batch_norm=d.head_batch_norm, norm_last_layer=d.norm_last_layer)
    if d.head_layers != 3:  # lightly's head has the official 3; rebuild the MLP with n layers
        dims = [input_dim] + [d.hidden_dim] * (d.head_layers - 1) + [d.bottleneck_dim]
        blocks = [(i, o, nn.BatchNorm1d(o) if d.head_batch_norm else None, nn.GELU())
                  for i, o in zip(dims[:-2], dims[1:-1])]
        head.layers = ProjectionHead([*blocks, (dims[-2], dims[-1], None, None)]).layers
        head.layers.apply(head._init_weights)
    if d.head_init == "torch":
        for module in head.layers.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    return head


class DINO(TeacherStudentMethod):
    def __init__(self, cfg: Config, in_chans: int, num_classes: int = 0):
        d = cfg.section(DINOConfig)

        def build() -> dict[str, nn.Module]:
            backbone = backbone_from_config(cfg, in_chans)
            return {"backbone": backbone, "head": dino_head(backbone.num_features, d)}

        super().__init__(cfg, build, teacher_keys=["backbone", "head"])
        self.warmup_teacher_temp, self.final_teacher_temp = d.warmup_teacher_temp, d.teacher_temp
        # Warm-ups stated in epochs are fractions of the samples to be seen.
        self.temp_warmup = min(d.warmup_teacher_temp_epochs / cfg.train.epochs, 1.0)
        self.freeze_last_layer = d.freeze_last_layer_epochs / cfg.train.epochs
        self.base_center_momentum = d.center_momentum
        self.criterion = DINOLoss(output_dim=d.output_dim, teacher_temp=d.teacher_temp,
                                  student_temp=d.student_temp, center_momentum=d.center_momentum)
        self.progress, self.teacher_temp = 0.0, d.warmup_teacher_temp
        self.batch_views = d.batch_views

    def teacher_temperature(self, progress: float) -> float:
        """Linear warm-up from warmup_teacher_temp to teacher_temp, then constant (Sec. 3.1)."""
        if progress >= self.temp_warmup:
            return self.final_teacher_temp
        span = self.final_teacher_temp - self.warmup_teacher_temp
        return self.warmup_teacher_temp + span * progress / self.temp_warmup

    def prepare_step(self, progress: float, momentum: MomentumRule) -> None:
        self.progress = progress
        self.teacher_temp = self.teacher_temperature(progress)
        # lightly's DINOLoss steps the centre inside forward with this attribute.
        self.criterion.center_momentum = momentum.per_forward(self.base_center_momentum).value

    def before_optimizer_step(self) -> None:
        # Early on the last layer gets no update: it stabilises training (official code,
        # cancel_gradients_last_layer).
        if self.progress < self.freeze_last_layer:
            for p in self.student["head"].last_layer.parameters():
                p.grad = None

    def _forward(self, modules: nn.ModuleDict, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of one resolution in one pass, (V*B, C, H, W) -> V x (B, D); or, without
        ``dino.batch_views``, one pass per view (BatchNorm statistics per view)."""
        if not self.batch_views:
            return [modules["head"](modules["backbone"](v)) for v in views]
        out = modules["head"](modules["backbone"](torch.cat(views)))
        return list(out.chunk(len(views)))

    def forward(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        crops = Views.of(batch).views
        global_views, local_views = list(crops[:2]), list(crops[2:])
        with torch.no_grad():
            teacher_out = self._forward(self.teacher, global_views)  # 2 x (B, D)
        student_out = self._forward(self.student, global_views)
        if local_views:
            student_out += self._forward(self.student, local_views)  # + N x (B, D)
        with torch.autocast(student_out[0].device.type, enabled=False):
            loss = self.criterion(_fp32(teacher_out), _fp32(student_out),
                                  teacher_temp=self.teacher_temp)
        return {"loss": loss, "teacher_temp": torch.tensor(self.teacher_temp),
                "center_norm": self.criterion.center.norm()}


def _fp32(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """bf16/fp16 -> fp32 (fp32 and fp64 as they are)."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in outputs]


def _multicrop(cfg: Config) -> dict[str, Any]:
    d = cfg.section(DINOConfig)
    return {"local_views": d.local_views, "local_size": d.local_size,
            "global_scale": d.global_scale, "local_scale": d.local_scale}


def loader_views(cfg: Config, family: str, mean: Any, std: Any) -> views.Transform:
    """Multi-crop: two global views at data.image_size, dino.local_views local ones."""
    multicrop = views.digits_multicrop if family == "digits" else views.dino_rgb_views
    return multicrop(cfg.data.image_size, mean, std, **_multicrop(cfg))


def device_views(cfg: Config) -> tuple[gpu_augment.ViewSpec, ...]:
    d = cfg.section(DINOConfig)
    return gpu_augment.dino_specs(cfg.data.image_size, d.local_size, d.local_views,
                                  d.global_scale, d.local_scale)
