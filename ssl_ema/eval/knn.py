"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, Sec. 3.4).

The vote of each of the k nearest training features (cosine similarity s) is weighted by
exp(s / t); we use lightly's `knn_predict`, the protocol behind its published benchmarks
(k=200, t=0.1), and only add chunking so the similarity matrix fits in memory.
"""

from __future__ import annotations

import torch
from lightly.utils.benchmarking import knn_predict


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels ``(M,)`` for L2-normalised ``test_features (M, D)``.

    ``train_features (N, D)`` must be L2-normalised too; k is capped at N.
    """
    bank = train_features.t().contiguous()  # (D, N)
    k = min(k, train_features.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        ranked = knn_predict(test_features[start:start + chunk], bank, train_labels,
                             num_classes, knn_k=k, knn_t=temperature)  # (b, C), best first
        preds.append(ranked[:, 0])
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy of weighted kNN on the test set."""
    pred = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    return (pred == test_labels).float().mean().item()
