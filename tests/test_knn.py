from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_ema.eval.knn import knn_accuracy, knn_classify


def test_weighted_vote_on_a_hand_computed_case() -> None:
    # Bank: two class-0 points near the x axis, one class-1 point on the y axis.
    bank = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    # A query at 50 degrees: closer to class 1 (cos 0.77) than to either class-0 point.
    q = torch.tensor([[math.cos(math.radians(50)), math.sin(math.radians(50))]])
    sims = (q @ bank.t())[0]
    # With k=3 and t=0.1 the votes are exp(s/t): class 1 wins only if its single weight beats
    # the sum of the two class-0 weights. Check that against the hand computation.
    w = torch.exp(sims / 0.1)
    expected = int(w[2] > w[0] + w[1])
    assert knn_classify(bank, labels, q, num_classes=2, k=3, temperature=0.1).item() == expected
    # With k=1 the nearest neighbour decides: class 1.
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
