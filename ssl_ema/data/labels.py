"""Training labels for the classification methods: splits, noisy labels, labelled/unlabelled.

Applied by `build_data` after a builder made its bundle (``ssl_ema.config.LabelsConfig``):
1. CIFAR-10N labels replace the training labels (``labels.noisy``); test labels stay clean.
2. A stratified, seeded validation split (``labels.val_fraction``; Morales-Brotons et al. 2024
   choose the best EMA and epoch on 20% of the training set). It carries the training labels
   (noisy, if they are): a practitioner has no clean ones to select with.
3. Synthetic symmetric noise (``labels.symmetric_noise``) flips training labels, validation
   split included (same reason); the split is drawn before it, so every noise level holds out
   the same images and a run differs from its clean twin in the labels alone.
4. supervised: the rest trains with weak views. pseudo_label: a labelled subset of
   ``labels.per_class`` images per class (seeded), and the other images as unlabelled data.

Every split is a function of ``run.seed`` alone, so it is the same on every process and resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.data.classify_views import Unlabelled, WeakStrong
from ssl_ema.data.noisy_labels import (
    attach_noisy_labels,
    imagefolder_original_index,
    load_cifar10n,
)
from ssl_ema.data.seeded import SeededViews, Transformed
from ssl_ema.data.synthetic_noise import noise_rate, symmetric_noise


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ConfigError(f"labels.per_class={per_class}: class {c} has only {len(members)} "
                              "training images; lower it")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, fraction: float, seed: int, min_per_class: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sorted indices; ``fraction`` of each class held out (rounded), at least
    ``min_per_class`` of a class with more than one member. The one split of the package: the
    validation split of classification runs (``labels.val_fraction``) and the linear probe's
    weight-decay split (``min_per_class=1``)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(fraction * len(members)))
        if len(members) > 1:
            n = max(n, min_per_class)
        held.append(members[:n])
        train.append(members[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


class Relabelled(Dataset):
    """``(image, label)`` source with its labels replaced (e.g. by CIFAR-10N's)."""

    def __init__(self, source: Any, labels: np.ndarray):
        self.source, self.labels = source, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.source[i][0], int(self.labels[i])


class LabelledUnlabelled(Dataset):
    """Item i: one labelled image and ``mu`` unlabelled ones, with their (hidden) true labels.

    An epoch is one pass over the unlabelled images (FixMatch counts progress in unlabelled
    data), grouped into ``mu`` consecutive images of a seeded permutation; the loader shuffles the
    groups. The labelled image is drawn at random (with replacement, as TorchSSL's sampler) from
    torch's generator, which `SeededViews` seeds per (seed, epoch, index): resume stays exact.
    Returns ``((labelled, [unlabelled...]), labels (1 + mu,))``: the labelled image's training
    label, then the unlabelled images' true labels, used only to measure pseudo-label accuracy.
    """

    def __init__(self, source: Any, labelled: np.ndarray, unlabelled: np.ndarray, mu: int,
                 true_labels: np.ndarray, seed: int):
        self.source, self.labelled, self.mu, self.true_labels = source, labelled, mu, true_labels
        self.unlabelled = np.random.default_rng(seed).permutation(unlabelled)

    def __len__(self) -> int:
        return len(self.unlabelled) // self.mu

    def __getitem__(self, i: int) -> tuple[tuple[Any, list[Any]], torch.Tensor]:
        j = int(self.labelled[torch.randint(len(self.labelled), ()).item()])
        image, label = self.source[j]
        group = self.unlabelled[i * self.mu:(i + 1) * self.mu]
        images = [self.source[int(k)][0] for k in group]
        labels = torch.tensor([label, *self.true_labels[group]], dtype=torch.int64)
        return (image, images), labels


class SemiViews:
    """(labelled, [unlabelled]) -> [weak labelled (C,H,W), weak (mu,C,H,W), strong (mu,C,H,W)]."""

    def __init__(self, views: WeakStrong):
        self.views = views

    def __call__(self, pair: tuple[Any, list[Any]]) -> list[torch.Tensor]:
        labelled, unlabelled = pair
        weak = torch.stack([self.views.weak(u) for u in unlabelled])  # type: ignore[misc]
        strong = torch.stack([self.views.strong(u) for u in unlabelled])  # type: ignore[misc]
        return [self.views.weak(labelled), weak, strong]  # type: ignore[list-item]


def source_targets(source: Any) -> np.ndarray:
    """Integer labels of a digits, torchvision CIFAR or ImageFolder training set."""
    for attr in ("labels", "targets"):
        if hasattr(source, attr):
            return np.asarray(getattr(source, attr), dtype=np.int64)
    raise TypeError(f"cannot read the labels of {type(source).__name__}")


def _noisy(source: Any, targets: np.ndarray, cfg: Config) -> np.ndarray:
    sets = load_cifar10n(cfg.labels.noisy_file)
    if cfg.data.dataset == "imagefolder":
        index = imagefolder_original_index(source.samples, sets["clean"])
    else:  # torchvision's CIFAR10 keeps the original order
        index = np.arange(len(targets))
    return attach_noisy_labels(targets, index, sets, cfg.labels.noisy)


def apply_labels(bundle: Any, cfg: Config, unlabelled: Unlabelled | None) -> Any:
    """The bundle a classification method trains on (see the module docstring); with
    ``unlabelled`` (the registry's ``labels="semi"``), a labelled subset plus unlabelled groups."""
    lab, seed = cfg.labels, cfg.run.seed
    source, views = bundle.train.source, bundle.train.transform
    plain = bundle.train_eval.transform
    true = source_targets(source)
    labels = true if lab.noisy == "clean" else _noisy(source, true, cfg)
    train_idx, val_idx = stratified_split(labels, lab.val_fraction, seed)
    noise: dict[str, float] = {}
    if lab.symmetric_noise:
        # The validation split keeps the noisy labels: a practitioner selects the best EMA and
        # epoch with the labels they have, and only the test set is clean.
        labels = symmetric_noise(labels, lab.symmetric_noise, bundle.num_classes, seed)
        noise = {"symmetric_noise": lab.symmetric_noise,
                 "realised_train": noise_rate(labels[train_idx], true[train_idx])}
        if len(val_idx):
            noise["realised_val"] = noise_rate(labels[val_idx], true[val_idx])
    data = Relabelled(source, labels)
    val = Transformed(Subset(data, val_idx.tolist()), plain) if len(val_idx) else None
    if unlabelled is not None:
        labelled = train_idx[per_class_subset(labels[train_idx], lab.per_class, seed)]
        rest = np.setdiff1d(train_idx, labelled)
        groups = LabelledUnlabelled(data, labelled, rest, unlabelled.mu, true, seed)
        train: Any = SeededViews(groups, SemiViews(views), seed)
    else:  # supervised: on every training label, or on a labelled subset only
        if lab.per_class:
            train_idx = train_idx[per_class_subset(labels[train_idx], lab.per_class, seed)]
        train = SeededViews(Subset(data, train_idx.tolist()), views, seed)
    # The plain training images serve BatchNorm recomputation (and kNN, if asked).
    train_eval = Transformed(Subset(data, train_idx.tolist()), plain)
    return dataclasses.replace(bundle, train=train, train_eval=train_eval, val_eval=val,
                               label_noise=noise)
