"""Supervised training with model EMAs (Morales-Brotons, Vogels, Hendrikx, TMLR 2024).

student: backbone -> linear classifier, trained with cross-entropy (optionally label-smoothed);
teacher and ``ema.extra_momenta`` copies: EMAs of both, never trained on, only evaluated (with
and without BatchNorm recomputation) to pick the best EMA and epoch on a validation split. The
paper's five EMAs, updated every 16 steps, are ``ema.period=16`` with the momenta per step.
Fine-tuning a pretrained backbone is this method with ``model.init_from``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_ema.config import Config
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.models.classifier import classifier_modules
from ssl_ema.schedules import cosine


class Supervised(TeacherStudentMethod):
    evaluation = "classify"

    def __init__(self, cfg: Config, in_chans: int, num_classes: int):
        super().__init__(lambda: classifier_modules(cfg, in_chans, num_classes),
                         teacher_keys=["backbone", "classifier"],
                         num_ema_copies=len(cfg.ema.extra_momenta))
        self.momentum_start, self.momentum_end = cfg.method.momentum, cfg.method.momentum_end
        self.label_smoothing = cfg.supervised.label_smoothing

    def momentum(self, progress: float) -> float:
        return cosine(self.momentum_start, self.momentum_end, progress)

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]  # (B, C, H, W), (B,)
        s = self.student
        logits = s["classifier"](s["backbone"](x))  # (B, K)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == y).float().mean()
        return {"loss": loss, "train_accuracy": accuracy}
