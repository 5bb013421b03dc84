"""BYOL (Grill et al., NeurIPS 2020) with lightly's heads and loss.

student: backbone -> projection -> prediction; teacher: EMA of backbone -> projection.
Symmetric loss over the two views: each view's prediction regresses the teacher's projection
of the other view (Sec. 3.1, Eq. 2-3), with cosine momentum 0.99 -> 1 (Sec. 3.2).
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from ssl_ema.config import Config
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.models.backbones import build_backbone
from ssl_ema.schedules import cosine


class BYOL(TeacherStudentMethod):
    def __init__(self, cfg: Config, in_chans: int):
        m = cfg.method

        def build() -> dict[str, nn.Module]:
            backbone = build_backbone(
                cfg.model.backbone,
                in_chans=in_chans,
                image_size=cfg.data.image_size,
                cifar_stem=cfg.model.cifar_stem,
                init=cfg.model.init,
                stem_activation=cfg.model.stem_activation,
            )
            dim = backbone.num_features
            return {
                "backbone": backbone,
                "projection": BYOLProjectionHead(dim, m.projection_hidden_dim, m.projection_dim),
                "prediction": BYOLPredictionHead(
                    m.projection_dim, m.prediction_hidden_dim, m.projection_dim
                ),
            }

        super().__init__(build, teacher_keys=["backbone", "projection"],
                         num_ema_copies=len(cfg.ema.extra_momenta))
        self.momentum_start, self.momentum_end = m.momentum, m.momentum_end
        # -cos(p, z), averaged over the two directions as in lightly's CIFAR-10 benchmark, so its
        # learning rates carry over. BYOL's 2 - 2cos summed over directions has 4x the gradient.
        self.criterion = NegativeCosineSimilarity()

    def momentum(self, progress: float) -> float:
        return cosine(self.momentum_start, self.momentum_end, progress)

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        s = self.student
        return s["prediction"](s["projection"](s["backbone"](x)))

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t["projection"](t["backbone"](x))

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        view0, view1 = batch[0], batch[1]  # (B, C, H, W) each
        p0, p1 = self._student(view0), self._student(view1)  # (B, D)
        z0, z1 = self._teacher(view0), self._teacher(view1)  # (B, D), no graph
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return {"loss": loss, "cosine": -loss.detach()}
