"""Synthetic symmetric label noise for any labelled data set (``labels.symmetric_noise``).

With probability ``rate`` each training label is replaced by a class drawn uniformly from the
*other* classes, so a flipped label is never the true one and the realised noise rate is
``rate`` in expectation (symmetric flipping, as in Han et al. 2018, "Co-teaching").
Morales-Brotons et al. (2024) measure EMAs under CIFAR-N's human noise; synthetic noise asks
the same question (do EMAs of weights resist memorising wrong labels?) on any data set, the
CPU-sized digits included, at a chosen rate.

The draws are a function of ``(seed, image index)`` alone: NumPy's generator is seeded once and
draws one (coin, offset) pair per image in index order, so every process, loader worker and
resume sees the same labels, and the flip of an image does not depend on the split it falls in.
"""

from __future__ import annotations

import numpy as np

# A second seed word keeps this stream apart from the other draws seeded with run.seed (splits,
# subsets): adding noise changes nothing else in a run.
_STREAM = 401


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """A copy of ``labels (N,)`` with each entry, with probability ``rate``, moved to another
    class chosen uniformly among the ``num_classes - 1`` others."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"symmetric noise rate must lie in [0, 1), got {rate}")
    if num_classes < 2:
        raise ValueError(f"symmetric noise needs at least 2 classes, got {num_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, _STREAM])
    u = rng.random((len(labels), 2))  # (N, 2): image i takes draws 2i and 2i + 1
    flip = u[:, 0] < rate
    offset = 1 + np.floor(u[:, 1] * (num_classes - 1)).astype(np.int64)  # 1..K-1: never y
    return np.where(flip, (labels + offset) % num_classes, labels)


def noise_rate(noisy: np.ndarray, true: np.ndarray) -> float:
    """Fraction of labels that differ from the true ones (0.0 for no labels)."""
    return float((noisy != true).mean()) if len(true) else 0.0


def describe_noise(noise: dict[str, float]) -> str:
    """The run header's line for ``DataBundle.label_noise``."""
    val = f", validation {noise['realised_val']:.4f}" if "realised_val" in noise else ""
    return (f"labels: symmetric noise {noise['symmetric_noise']:g} requested; realised: training "
            f"{noise['realised_train']:.4f}{val} (test labels clean)")
