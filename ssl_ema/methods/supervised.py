"""Supervised training with model EMAs (Morales-Brotons, Vogels, Hendrikx, TMLR 2024).

student: backbone -> linear classifier, trained with cross-entropy (optionally label-smoothed);
teacher and ``ema.extra_momenta`` copies: EMAs of both, never trained on, only evaluated (with
and without BatchNorm recomputation) to pick the best EMA and epoch on a validation split. The
paper's five EMAs, updated every 16 steps, are ``ema.period=16`` with the momenta per step.
Fine-tuning a pretrained backbone is this method with ``model.init_from``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssl_ema.config_schema import Config
from ssl_ema.data import classify_views
from ssl_ema.data.batch import Views
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.supervised_spec import SupervisedConfig
from ssl_ema.models.classifier import classifier_modules


class Supervised(TeacherStudentMethod):
    evaluation = "classify"

    def __init__(self, cfg: Config, in_chans: int, num_classes: int):
        super().__init__(cfg, lambda: classifier_modules(cfg, in_chans, num_classes),
                         teacher_keys=["backbone", "classifier"])
        self.label_smoothing = cfg.section(SupervisedConfig).label_smoothing

    def forward(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        (x,), y = Views.of(batch)  # (B, C, H, W), (B,)
        s = self.student
        logits = s["classifier"](s["backbone"](x))  # (B, K)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == y).float().mean()
        return {"loss": loss, "train_accuracy": accuracy}


def weak_views(cfg: Config, family: str, mean: Any, std: Any) -> classify_views.WeakStrong:
    """Weak views (pad-crop + flip) only: every training image is labelled."""
    return classify_views.weak_strong(family, cfg.data.image_size, mean, std, None)
