"""Weak and strong views of the classification methods on the device (``data.pipeline=device``).

The same distributions as the loader pipeline's `classify_views` (FixMatch, Sohn et al. 2020,
Sec. 2.3): weak = a random crop of the image reflect-padded by 1/8 of its side, then a
horizontal flip with probability 1/2; strong = an independent weak view, RandAugment
(`gpu_randaugment`, torchvision's op set) and a Cutout-like erasing of a square of 2-25% of the
image (``v2.RandomErasing(scale=(0.02, 0.25), ratio=(1, 1), value=0)``, on normalised pixels).

Streams, as `device.DeviceTrainStream`: order and every view's parameters are drawn per epoch
on a CPU generator seeded by (seed, epoch), so a batch is a function of (seed, epoch, index),
the same after a resume and under any number of processes (rank r takes the r-th chunk).
- ``supervised``: ``(weak (B, C, S, S), labels (B,))``.
- ``pseudo_label``: an epoch is one pass over a fresh permutation of the unlabelled images, μ
  per item, each item with one labelled image drawn with replacement (as `LabelledUnlabelled`):
  ``(weak labelled (B, C, S, S), weak (B, μ, C, S, S), strong (B, μ, C, S, S),
  labels (B, 1 + μ))`` with the labelled image's training label, then the unlabelled images'
  true labels (only measured, never trained on).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset
from torchvision.transforms.v2 import functional as TF

from ssl_ema.config_schema import Config
from ssl_ema.data.classify_views import Unlabelled
from ssl_ema.data.datasets import DataBundle
from ssl_ema.data.gpu_randaugment import draw_ops, rand_augment
from ssl_ema.data.labels import LabelledUnlabelled
from ssl_ema.data.uint8 import check_fits, decode_uint8


@dataclass(frozen=True)
class ClassifySpec:
    """One view's distribution: weak (``num_ops=0``) or strong."""

    size: int
    num_ops: int = 0  # RandAugment ops; 0 = a weak view
    magnitude: int = 10
    erase: tuple[float, float] = (0.02, 0.25)  # Cutout area fraction (strong views only)

    @property
    def pad(self) -> int:
        return self.size // 8


class ClassifyParams(NamedTuple):
    """Per-sample parameters of one view; first dim: the sample."""

    offset: Tensor  # (N, 2) crop origin (x, y) in the padded image
    flip: Tensor  # (N,) bool
    op: Tensor  # (N, num_ops) RandAugment op indices
    value: Tensor  # (N, num_ops) their signed magnitudes
    erase: Tensor  # (N, 4) erased box x1, y1, x2, y2 (empty for weak views)

    def take(self, index: Tensor) -> ClassifyParams:
        return ClassifyParams(*(t[index] for t in self))

    def to(self, device: torch.device | str) -> ClassifyParams:
        return ClassifyParams(*(t.to(device, non_blocking=True) for t in self))


def draw_classify(spec: ClassifySpec, n: int, g: torch.Generator) -> ClassifyParams:
    """``n`` views' parameters on the CPU generator ``g`` (torchvision's distributions)."""
    offset = torch.randint(2 * spec.pad + 1, (n, 2), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    op, value = draw_ops(n, spec.num_ops, spec.magnitude, spec.size, spec.size, g)
    erase = torch.zeros(n, 4, dtype=torch.int64)
    if spec.num_ops:
        # RandomErasing: area uniform in `erase`, ratio 1, side round(sqrt(area)); always fits
        area = spec.size**2 * (spec.erase[0] + (spec.erase[1] - spec.erase[0])
                               * torch.rand(n, generator=g, dtype=torch.float64))
        side = torch.round(torch.sqrt(area)).long()
        top = (torch.rand(n, generator=g, dtype=torch.float64) * (spec.size - side + 1)).long()
        left = (torch.rand(n, generator=g, dtype=torch.float64) * (spec.size - side + 1)).long()
        erase = torch.stack([left, top, left + side, top + side], 1)
    return ClassifyParams(offset, flip, op, value, erase)


def pad_crop_flip(x: Tensor, offset: Tensor, flip: Tensor, size: int, pad: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): reflect-pad, crop at ``offset``, flip (gathers)."""
    if x.shape[-1] != size or x.shape[-2] != size:
        x = TF.resize(x, [size], antialias=True)  # as the loader's v2.Resize
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    steps = torch.arange(size, device=x.device)
    cols = offset[:, 0, None] + steps  # (B, S)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = offset[:, 1, None] + steps
    b = torch.arange(len(x), device=x.device)[:, None, None]
    return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, S, S)


def erase_box(x: Tensor, box: Tensor) -> Tensor:
    """Zero each image inside its box (x1, y1, x2, y2)."""
    s = torch.arange(x.shape[-1], device=x.device)
    inside_x = (s >= box[:, 0, None]) & (s < box[:, 2, None])  # (B, W)
    inside_y = (s[:x.shape[-2]] >= box[:, 1, None]) & (s[:x.shape[-2]] < box[:, 3, None])
    mask = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return x.masked_fill(mask, 0.0)


def make_view(images: Tensor, p: ClassifyParams, spec: ClassifySpec, mean: Tensor,
              std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) + this batch's parameters -> normalised float (B, C, S, S)."""
    x = pad_crop_flip(images, p.offset, p.flip, spec.size, spec.pad).float()  # 0..255
    if spec.num_ops:
        x = rand_augment(x, p.op, p.value)
    x = (x / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return erase_box(x, p.erase) if spec.num_ops else x


class ClassifyStream:
    """The epoch mechanics shared by both streams; subclasses draw and make the views."""

    def __init__(self, images: Tensor, items: int, mean: Sequence[float], std: Sequence[float],
                 batch: int, *, seed: int, rank: int = 0, world: int = 1,
                 channels_last: bool = False):
        self.images, self.items, self.batch = images, items, batch
        self.seed, self.rank, self.world = seed, rank, world
        self.mean = torch.tensor(mean, device=images.device)
        self.std = torch.tensor(std, device=images.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch: int | None = None

    def __len__(self) -> int:
        return self.items // (self.batch * self.world)  # drop the last partial batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.draw(torch.Generator().manual_seed(hash((self.seed, epoch)) % 2**63))

    def draw(self, g: torch.Generator) -> None:
        raise NotImplementedError

    def make(self, items: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def view(self, images: Tensor, p: ClassifyParams, spec: ClassifySpec) -> Tensor:
        return make_view(images, p, spec, self.mean, self.std).contiguous(
            memory_format=self.memory_format)

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, ...]]:
        """Batches ``start``, ``start + 1``, ... of the epoch set by `set_epoch`."""
        if self.epoch is None:
            raise RuntimeError("call set_epoch before iterating")
        for step in range(start, len(self)):
            lo = (step * self.world + self.rank) * self.batch
            yield self.make(torch.arange(lo, lo + self.batch, device=self.images.device))

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return self.iter_from(0)


class SupervisedStream(ClassifyStream):
    """``(weak, labels)``: every training image once per epoch, in a seeded order."""

    def __init__(self, images: Tensor, labels: Tensor, weak: ClassifySpec,
                 mean: Sequence[float], std: Sequence[float], batch: int, *, seed: int,
                 rank: int = 0, world: int = 1, channels_last: bool = False):
        super().__init__(images, len(images), mean, std, batch, seed=seed, rank=rank,
                         world=world, channels_last=channels_last)
        self.labels, self.weak = labels, weak

    def draw(self, g: torch.Generator) -> None:
        device = self.images.device
        self.order = torch.randperm(self.items, generator=g).to(device)
        self.params = draw_classify(self.weak, self.items, g).to(device)

    def make(self, items: Tensor) -> tuple[Tensor, ...]:
        index = self.order[items]  # (B,) sample indices
        return self.view(self.images[index], self.params.take(index), self.weak), \
            self.labels[index]


class SemiSupervisedStream(ClassifyStream):
    """``(weak labelled, weak unlabelled, strong unlabelled, labels)``: μ unlabelled images per
    item, one pass over them per epoch, each item with a labelled image drawn with
    replacement."""

    def __init__(self, images: Tensor, labels: Tensor, true_labels: Tensor, labelled: Tensor,
                 unlabelled: Tensor, mu: int, weak: ClassifySpec, strong: ClassifySpec,
                 mean: Sequence[float], std: Sequence[float], batch: int, *, seed: int,
                 rank: int = 0, world: int = 1, channels_last: bool = False):
        super().__init__(images, len(unlabelled) // mu, mean, std, batch, seed=seed, rank=rank,
                         world=world, channels_last=channels_last)
        self.labels, self.true_labels, self.mu = labels, true_labels, mu
        self.labelled, self.unlabelled = labelled, unlabelled
        self.weak, self.strong = weak, strong

    def draw(self, g: torch.Generator) -> None:
        device, n = self.images.device, self.items
        self.order = self.unlabelled[torch.randperm(len(self.unlabelled), generator=g)
                                     .to(device)][:n * self.mu].view(n, self.mu)
        self.pick = self.labelled[torch.randint(len(self.labelled), (n,), generator=g)
                                  .to(device)]
        self.p_labelled = draw_classify(self.weak, n, g).to(device)
        self.p_weak = draw_classify(self.weak, n * self.mu, g).to(device)
        self.p_strong = draw_classify(self.strong, n * self.mu, g).to(device)

    def make(self, items: Tensor) -> tuple[Tensor, ...]:
        b, mu = len(items), self.mu
        lab, unl = self.pick[items], self.order[items].flatten()  # (B,), (B*mu,)
        slots = (items[:, None] * mu + torch.arange(mu, device=items.device)).flatten()
        u = self.images[unl]
        x = self.view(self.images[lab], self.p_labelled.take(items), self.weak)
        weak = self.view(u, self.p_weak.take(slots), self.weak)
        strong = self.view(u, self.p_strong.take(slots), self.strong)
        labels = torch.cat([self.labels[lab, None], self.true_labels[unl].view(b, mu)], 1)
        return x, weak.unflatten(0, (b, mu)), strong.unflatten(0, (b, mu)), labels


def strong_spec(size: int, unlabelled: Unlabelled) -> ClassifySpec:
    """The strong views of a semi-supervised method's unlabelled images."""
    return ClassifySpec(size, unlabelled.ops, unlabelled.magnitude)


def classify_streams(bundle: DataBundle, cfg: Config, per_device: dict[int, int],
                     device: torch.device, rank: int, world: int
                     ) -> tuple[dict[int, ClassifyStream], Tensor, Tensor]:
    """The training streams per batch size, and the training images and labels they hold (in
    the order of ``bundle.train_eval``, the BatchNorm-recomputation and kNN bank)."""

    data = bundle.train.source
    workers, weak = cfg.data.num_workers, ClassifySpec(cfg.data.image_size)
    flags = {"seed": cfg.run.seed, "rank": rank, "world": world,
             "channels_last": cfg.train.channels_last}
    if isinstance(data, LabelledUnlabelled):
        unlabelled = bundle.method.unlabelled if bundle.method is not None else None
        assert unlabelled is not None  # LabelledUnlabelled data only for labels="semi"
        strong = strong_spec(cfg.data.image_size, unlabelled)
        index = np.union1d(data.labelled, data.unlabelled)  # sorted: train_eval's order
        images, labels = decode_uint8(Subset(data.source, index.tolist()), workers)
        check_fits(images, device)
        images, labels = images.to(device), labels.to(device)
        true = torch.as_tensor(data.true_labels[index], device=device)

        def position(of: np.ndarray) -> Tensor:
            return torch.as_tensor(np.searchsorted(index, np.sort(of)), device=device)

        streams: dict[int, ClassifyStream] = {
            b: SemiSupervisedStream(images, labels, true, position(data.labelled),
                                    position(data.unlabelled), data.mu, weak, strong,
                                    bundle.mean, bundle.std, per, **flags)
            for b, per in per_device.items()}
    else:
        images, labels = decode_uint8(data, workers)
        check_fits(images, device)
        images, labels = images.to(device), labels.to(device)
        streams = {b: SupervisedStream(images, labels, weak, bundle.mean, bundle.std,
                                       per, **flags) for b, per in per_device.items()}
    return streams, images, labels
