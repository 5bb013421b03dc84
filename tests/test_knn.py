from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_ema.eval.knn import knn_accuracy, knn_classify


def test_weighted_vote_on_a_hand_computed_case() -> None:
    # Bank: two class-0 points near the x axis, one class-1 point on the y axis.
    bank = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    # A query at 60 degrees: cosine 0.500 and 0.660 to the class-0 points, 0.866 to class 1.
    q = torch.tensor([[math.cos(math.radians(60)), math.sin(math.radians(60))]])
    sims = (q @ bank.t())[0]
    torch.testing.assert_close(sims, torch.tensor([0.5, 0.6601, 0.8660]), atol=1e-4, rtol=0)
    # k=3, t=0.1: votes exp(s/t) = 148 + 735 for class 0 against 5755 for class 1.
    assert knn_classify(bank, labels, q, num_classes=2, k=3, temperature=0.1).item() == 1
    # k=1: the nearest neighbour decides.
    assert knn_classify(bank, labels, q, num_classes=2, k=1, temperature=0.1).item() == 1
    # A large temperature flattens the weights: two class-0 votes beat one class-1 vote.
    assert knn_classify(bank, labels, q, num_classes=2, k=3, temperature=100.0).item() == 0


def test_accuracy_on_separable_clusters_and_k_capped() -> None:
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, 16, generator=g), dim=1) * 5
    y = torch.arange(3).repeat_interleave(20)
    x = F.normalize(centers[y] + 0.1 * torch.randn(60, 16, generator=g), dim=1)
    acc = knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], num_classes=3, k=200)  # k > N
    assert acc == 1.0
    shuffled = y[::2][torch.randperm(30, generator=g)]
    assert knn_accuracy(x[::2], shuffled, x[1::2], y[1::2], num_classes=3, k=1) < 0.8
