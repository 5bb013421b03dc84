"""Labelled subsets, validation splits, CIFAR-10N and synthetic noisy labels (ssl_ema/data)."""

from __future__ import annotations

import re
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_ema.config import load_config
from ssl_ema.data.datasets import digits_split
from ssl_ema.data.labels import per_class_subset, stratified_split
from ssl_ema.data.noisy_labels import (
    attach_noisy_labels,
    imagefolder_original_index,
    load_cifar10n,
)
from ssl_ema.data.synthetic_noise import noise_rate, symmetric_noise
from ssl_ema.engine.loaders import build_run_data
from tests.helpers import SHARED_DATA

CIFAR10N = SHARED_DATA / "cifar10n" / "CIFAR-10_human.pt"
CIFAR10_JPG = SHARED_DATA / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def test_labelled_subset_is_by_count_per_class_and_seeded() -> None:
    y = digits_split()[2]  # the 1,437 training labels
    a = per_class_subset(y, 10, seed=0)
    assert np.bincount(y[a]).tolist() == [10] * 10
    assert np.array_equal(a, per_class_subset(y, 10, seed=0))  # reproducible ...
    assert not np.array_equal(a, per_class_subset(y, 10, seed=1))  # ... and a function of seed
    assert len(np.unique(a)) == 100
    with pytest.raises(ValueError, match="class 0 has only"):
        per_class_subset(y, 1000, seed=0)


def test_pseudo_label_bundle_splits_labelled_and_unlabelled() -> None:
    cfg = load_config(None, ["method.name=pseudo_label", "labels.per_class=4",
                             "pseudo_label.mu=3", "labels.val_fraction=0.2"])
    data = build_run_data(cfg)
    items = data.train.source
    y = digits_split()[2]
    val = np.asarray(data.val_eval.source.indices)
    assert np.bincount(y[items.labelled]).tolist() == [4] * 10
    # unlabelled = training images that are neither labelled nor held out for validation
    assert set(items.unlabelled) | set(items.labelled) | set(val) == set(range(len(y)))
    assert not set(items.unlabelled) & set(items.labelled)
    assert not set(val) & (set(items.unlabelled) | set(items.labelled))
    assert len(data.train) == len(items.unlabelled) // 3
    x, u_weak, u_strong, labels = data.train[5]
    assert u_weak.shape == u_strong.shape == (3, *x.shape) and labels.shape == (4,)
    group = items.unlabelled[15:18]
    assert labels[1:].tolist() == y[group].tolist()  # hidden true labels of the unlabelled
    again = data.train[5]  # the same (seed, epoch, index) -> the same views
    assert all((a == b).all() for a, b in zip(again, (x, u_weak, u_strong, labels)))


def test_validation_split_is_stratified_disjoint_and_seeded() -> None:
    y = digits_split()[2]
    train, val = stratified_split(y, 0.2, seed=0)
    assert not set(train) & set(val) and len(train) + len(val) == len(y)
    per_class = np.bincount(y)
    assert np.all(np.abs(np.bincount(y[val]) - 0.2 * per_class) <= 0.5)
    assert np.array_equal(val, stratified_split(y, 0.2, seed=0)[1])
    assert not np.array_equal(val, stratified_split(y, 0.2, seed=1)[1])


@pytest.mark.skipif(not CIFAR10N.is_file() or not CIFAR10_JPG.is_file(),
                    reason="needs ../shared/data (CIFAR-10N labels and the CIFAR-10 JPEG copy); "
                           "absent in a fresh clone")
def test_cifar10n_labels_line_up_with_the_jpeg_copy_at_the_published_rates() -> None:
    """Attach CIFAR-10N to the JPEG copy's train files by name (the archive is listed, not
    unpacked): the folder classes must equal the clean labels exactly, and each noisy set must
    disagree with them at the rate Wei et al. (2022) publish."""
    pattern = re.compile(r"train/(\w+)/(\d+)\.jpg$")
    with tarfile.open(CIFAR10_JPG) as tar:
        names = sorted(m.group(0) for n in tar.getnames() if (m := pattern.search(n)))
    samples = [(n, CLASSES.index(n.split("/")[1])) for n in names]
    assert len(samples) == 50_000
    sets = load_cifar10n(CIFAR10N)
    index = imagefolder_original_index(samples, sets["clean"])
    assert sorted(index.tolist()) == list(range(50_000))  # a bijection onto the original order
    folder = np.array([c for _, c in samples])
    rates = {name: float((attach_noisy_labels(folder, index, sets, name) != folder).mean())
             for name in ("clean", "aggre", "random1", "random2", "random3", "worse")}
    assert rates["clean"] == 0.0
    assert rates["aggre"] == pytest.approx(0.0901, abs=1e-4)
    assert rates["worse"] == pytest.approx(0.4021, abs=1e-4)
    for name in ("random1", "random2", "random3"):
        assert 0.17 <= rates[name] <= 0.182
    shuffled = folder.copy()
    shuffled[:10] = (shuffled[:10] + 1) % 10  # images that do not match are refused
    with pytest.raises(ValueError, match="10 of 50000 images disagree"):
        attach_noisy_labels(shuffled, index, sets, "aggre")


def test_symmetric_noise_flips_at_the_rate_to_other_classes_uniformly() -> None:
    y = digits_split()[2]  # the 1,437 training labels
    for rate in (0.2, 0.4):
        noisy = symmetric_noise(y, rate, 10, seed=0)
        # binomial standard deviation sqrt(0.4 * 0.6 / 1437) = 0.013: 3 sd
        assert noise_rate(noisy, y) == pytest.approx(rate, abs=0.04)
    # at rate 0.99 a flip that could land on the true class (1 in 10) would realise 0.89
    noisy = symmetric_noise(y, 0.99, 10, seed=0)
    assert noise_rate(noisy, y) == pytest.approx(0.99, abs=0.01)
    # a flipped label is uniform over the 9 other classes: ~10% of 1,437 images of true class 3
    # flip to each other class (expected 15.9 each, Poisson sd 4)
    counts = np.bincount(noisy[y == 3], minlength=10)
    assert counts[3] <= 5 and all(4 <= c <= 30 for i, c in enumerate(counts) if i != 3)
    assert np.array_equal(symmetric_noise(y, 0.0, 10, seed=0), y)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        symmetric_noise(y, 1.0, 10, seed=0)


def test_symmetric_noise_is_a_function_of_the_seed() -> None:
    y = digits_split()[2]
    a = symmetric_noise(y, 0.4, 10, seed=0)
    assert np.array_equal(a, symmetric_noise(y, 0.4, 10, seed=0))
    b = symmetric_noise(y, 0.4, 10, seed=1)
    assert (a != b).mean() > 0.3  # two independent 40% draws disagree on ~56% of the labels
    # the flips of the first images do not depend on how many images follow them
    assert np.array_equal(symmetric_noise(y[:100], 0.4, 10, seed=0), a[:100])


def labels_of(dataset: Dataset, workers: int = 0) -> np.ndarray:
    loader = DataLoader(dataset, batch_size=512, num_workers=workers)
    return torch.cat([batch[-1] for batch in loader]).numpy()


def test_symmetric_noise_in_a_run_flips_train_and_validation_not_test() -> None:
    base = ["method.name=supervised", "labels.val_fraction=0.2", "data.image_size=8",
            "data.num_workers=0"]
    clean = build_run_data(load_config(None, base))
    noisy = build_run_data(load_config(None, [*base, "labels.symmetric_noise=0.4"]))
    assert clean.label_noise == {}
    # the same images are held out at every noise level; only their labels differ
    assert clean.val_eval.source.indices == noisy.val_eval.source.indices
    y = digits_split()[2]
    val = np.asarray(noisy.val_eval.source.indices)
    val_labels = labels_of(noisy.val_eval, workers=2)  # loader workers see the same labels
    assert np.array_equal(labels_of(clean.val_eval), y[val])
    assert noise_rate(val_labels, y[val]) == pytest.approx(noisy.label_noise["realised_val"])
    assert noisy.label_noise["realised_val"] == pytest.approx(0.4, abs=0.09)  # 287 images
    train = np.asarray(noisy.train_eval.source.indices)
    train_labels = labels_of(noisy.train_eval)
    assert noise_rate(train_labels, y[train]) == noisy.label_noise["realised_train"]
    assert noisy.label_noise["realised_train"] == pytest.approx(0.4, abs=0.045)  # 1,150 images
    assert np.array_equal(labels_of(noisy.test_eval), digits_split()[3])  # test: clean
    assert np.array_equal(labels_of(noisy.test_eval), labels_of(clean.test_eval))
