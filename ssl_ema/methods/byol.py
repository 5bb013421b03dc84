"""BYOL (Grill et al., NeurIPS 2020) with lightly's heads and loss.

student: backbone -> projection -> prediction; teacher: EMA of backbone -> projection.
Symmetric loss over the two views: each view's prediction regresses the teacher's projection
of the other view (Sec. 3.1, Eq. 2-3), with cosine momentum 0.99 -> 1 (Sec. 3.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from ssl_ema.config_schema import Config
from ssl_ema.data.batch import Views
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.byol_spec import BYOLConfig
from ssl_ema.models.backbones import backbone_from_config


class BYOL(TeacherStudentMethod):
    def __init__(self, cfg: Config, in_chans: int, num_classes: int = 0):
        m = cfg.section(BYOLConfig)

        def build() -> dict[str, nn.Module]:
            backbone = backbone_from_config(cfg, in_chans)
            dim = backbone.num_features
            return {
                "backbone": backbone,
                "projection": BYOLProjectionHead(dim, m.projection_hidden_dim, m.projection_dim),
                "prediction": BYOLPredictionHead(
                    m.projection_dim, m.prediction_hidden_dim, m.projection_dim
                ),
            }

        super().__init__(cfg, build, teacher_keys=["backbone", "projection"])
        # -cos(p, z), averaged over the two directions as in lightly's CIFAR-10 benchmark, so its
        # learning rates carry over. BYOL's 2 - 2cos summed over directions has 4x the gradient.
        self.criterion = NegativeCosineSimilarity()

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        s = self.student
        return s["prediction"](s["projection"](s["backbone"](x)))

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        return t["projection"](t["backbone"](x))

    def forward(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        view0, view1 = Views.of(batch).views  # (B, C, H, W) each
        p0, p1 = self._student(view0), self._student(view1)  # (B, D)
        z0, z1 = self._teacher(view0), self._teacher(view1)  # (B, D), no graph
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return {"loss": loss, "cosine": -loss.detach()}
