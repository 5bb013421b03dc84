"""Semi-supervised pseudo-labelling with an EMA teacher (FixMatch's loss, Mean Teacher's labeller).

Busbridge et al. (2023, Sec. 3.3) scale exactly this set-up: the teacher, an EMA of the student,
labels unlabelled data and so feeds back into training; its momentum must follow the EMA Scaling
Rule when the batch changes (here through the engine, as every momentum). Per batch
(Sohn et al. 2020, Alg. 1, with the teacher in place of the student on weak views):

    loss = CE(student(weak labelled), y) + lambda_u * mean_u[ 1(max p_teacher(weak u) >= tau)
                                                         * CE(student(strong u), argmax p_teacher) ]

Labelled and strongly augmented unlabelled images go through the student in one forward
(FixMatch does the same, so BatchNorm sees both). ``train.batch_size`` is the labelled batch B;
each step also sees mu * B unlabelled images, and kappa scales both.

The student, teacher, momentum schedule and evaluation are the supervised method's (it is this
method without the unlabelled term), so this class extends `Supervised` rather than repeating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssl_ema.config_schema import Config
from ssl_ema.data.batch import Semi
from ssl_ema.data.classify_views import Unlabelled, WeakStrong, weak_strong
from ssl_ema.losses.pseudo_label import pseudo_label_loss, pseudo_labels
from ssl_ema.methods.pseudo_label_spec import PseudoLabelConfig
from ssl_ema.methods.supervised import Supervised


class PseudoLabel(Supervised):
    def __init__(self, cfg: Config, in_chans: int, num_classes: int):
        super().__init__(cfg, in_chans, num_classes)
        pl = cfg.section(PseudoLabelConfig)
        self.threshold, self.unlabelled_weight = pl.threshold, pl.unlabelled_weight
        # Over the epoch: correct masked, masked, correct (all), unlabelled images seen. A plain
        # tensor, not a buffer: DDP would broadcast rank 0's buffers over the others' counts.
        self.counts = torch.zeros(4, dtype=torch.float64)

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        sums = dict(zip(("pl_correct_masked", "pl_masked", "pl_correct", "pl_seen"),
                        self.counts.clone()))
        self.counts = torch.zeros_like(self.counts)
        return sums

    def forward(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        x, u_weak, u_strong, labels = Semi.of(batch)  # (B,C,H,W), (B,mu,C,H,W) x2, (B, 1 + mu)
        u_weak, u_strong = u_weak.flatten(0, 1), u_strong.flatten(0, 1)  # (B*mu, C, H, W)
        y, u_true = labels[:, 0], labels[:, 1:].flatten()  # (B,), (B*mu,): u_true hidden
        s, t = self.student, self.teacher
        logits = s["classifier"](s["backbone"](torch.cat([x, u_strong])))  # (B + B*mu, K)
        logits_l, logits_u = logits[:len(x)], logits[len(x):]
        with torch.no_grad():
            targets = pseudo_labels(t["classifier"](t["backbone"](u_weak)), self.threshold)
        loss_l = F.cross_entropy(logits_l.float(), y)
        loss_u = pseudo_label_loss(logits_u, targets)
        correct_masked, masked = targets.accuracy(u_true)
        correct = (targets.labels == u_true).sum().to(masked)
        seen = torch.full_like(masked, len(u_true))
        self.counts = self.counts.to(masked.device) + torch.stack(
            [correct_masked, masked, correct, seen]).double()  # no host sync
        return {"loss": loss_l + self.unlabelled_weight * loss_u,
                "loss_labelled": loss_l.detach(), "loss_unlabelled": loss_u.detach(),
                "mask_rate": targets.mask_rate}  # accuracy: per epoch (eval/classify.py)


def unlabelled(cfg: Config) -> Unlabelled:
    pl = cfg.section(PseudoLabelConfig)
    return Unlabelled(pl.mu, pl.randaugment_ops, pl.randaugment_magnitude)


def views(cfg: Config, family: str, mean: Any, std: Any) -> WeakStrong:
    """Weak views of the labelled images; weak and strong views of the unlabelled ones."""
    return weak_strong(family, cfg.data.image_size, mean, std, unlabelled(cfg))
