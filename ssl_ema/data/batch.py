"""The batch layout: what `ssl_ema.data` hands to a method's ``forward``.

Both data pipelines produce the same layout (the loader pipeline by default-collating
``SeededViews`` items, the device pipeline by `DeviceTrainStream`), as a flat tuple of tensors so
that Accelerate can move, split and concatenate it. A method reads its batch through one of the
named views below instead of indexing the tuple:

- `Views`: ``(*views, labels)``. V augmented views of the same B images, view v of shape
  (B, C, H_v, W_v) (DINO's local views are smaller than its global ones), float, normalised; then
  the images' labels (B,) int64. Self-supervised methods (BYOL: V = 2, DINO: 2 + local views,
  MoCo: 2) must not train on the labels; supervised training has V = 1 (the weak view) and does.
- `Semi`: ``(labelled, unlabelled_weak, unlabelled_strong, labels)`` for ``labels="semi"``
  methods (pseudo-labelling): B labelled weak views (B, C, H, W); mu unlabelled images per
  labelled one, weak and strong, (B, mu, C, H, W); labels (B, 1 + mu): the labelled image's
  training label, then the unlabelled images' true labels (hidden: only to measure pseudo-label
  accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor


class Views(NamedTuple):
    views: tuple[Tensor, ...]  # V x (B, C, H_v, W_v)
    labels: Tensor  # (B,) int64

    @classmethod
    def of(cls, batch: Sequence[Tensor]) -> Views:
        *views, labels = batch
        return cls(tuple(views), labels)


class Semi(NamedTuple):
    labelled: Tensor  # (B, C, H, W), weak view
    unlabelled_weak: Tensor  # (B, mu, C, H, W)
    unlabelled_strong: Tensor  # (B, mu, C, H, W)
    labels: Tensor  # (B, 1 + mu) int64: training label, then the hidden true labels

    @classmethod
    def of(cls, batch: Sequence[Tensor]) -> Semi:
        labelled, weak, strong, labels = batch
        return cls(labelled, weak, strong, labels)
