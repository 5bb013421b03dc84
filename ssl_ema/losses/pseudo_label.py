"""Confidence-thresholded pseudo-labels (FixMatch, Sohn et al. 2020, Eq. 4; Busbridge et al. 2023,
Sec. 3.3, with an EMA teacher as the labeller as in Mean Teacher, Tarvainen & Valpola 2017).

The teacher's prediction on a weak view becomes a hard label where its confidence (maximum
softmax probability) reaches the threshold tau; the student is trained with cross-entropy against
it on a strong view of the same image. The loss is averaged over *all* unlabelled images (masked
ones contribute zero), as in FixMatch, so its scale follows the mask rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PseudoLabels:
    labels: torch.Tensor  # (N,) int64: the teacher's arg-max class
    mask: torch.Tensor  # (N,) float: 1 where the confidence reaches the threshold
    confidence: torch.Tensor  # (N,) float: the teacher's maximum class probability

    @property
    def mask_rate(self) -> torch.Tensor:
        """Fraction of unlabelled images that receive a pseudo-label."""
        return self.mask.mean()

    def accuracy(self, true_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct pseudo-labels among the masked ones, number masked): hidden labels only."""
        correct = ((self.labels == true_labels).float() * self.mask).sum()
        return correct, self.mask.sum()


@torch.no_grad()
def pseudo_labels(teacher_logits: torch.Tensor, threshold: float) -> PseudoLabels:
    """Hard pseudo-labels and confidence mask from teacher logits ``(N, C)``."""
    probs = teacher_logits.float().softmax(dim=1)  # (N, C)
    confidence, labels = probs.max(dim=1)  # (N,) each
    return PseudoLabels(labels, (confidence >= threshold).float(), confidence)


def pseudo_label_loss(student_logits: torch.Tensor, targets: PseudoLabels) -> torch.Tensor:
    """Masked cross-entropy of student logits ``(N, C)`` against the pseudo-labels, mean over N."""
    per_image = F.cross_entropy(student_logits.float(), targets.labels, reduction="none")  # (N,)
    return (per_image * targets.mask).mean()
