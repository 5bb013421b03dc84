"""Churn and Jensen-Shannon divergence against hand values and scipy."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.distance import jensenshannon

from ssl_ema.eval.consistency import churn, js_divergence, pairwise_consistency


def test_identical_models_have_zero_churn_and_divergence() -> None:
    p = torch.randn(100, 7, generator=torch.Generator().manual_seed(0)).softmax(1)
    assert churn(p, p.clone()) == 0.0
    assert js_divergence(p, p.clone()) == pytest.approx(0.0, abs=1e-12)


def test_disjoint_one_hot_predictions() -> None:
    a = torch.eye(4)[[0, 1, 2, 3]]
    b = torch.eye(4)[[1, 2, 3, 0]]
    assert churn(a, b) == 1.0
    assert js_divergence(a, b) == pytest.approx(math.log(2))  # the maximum, in nats


def test_churn_and_js_by_hand_and_against_scipy() -> None:
    a = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    b = torch.tensor([[0.5, 0.5], [0.3, 0.7], [0.4, 0.6], [0.8, 0.2]])
    # argmax: a = 0, 1, 0, 0; b = 0 (tie -> first), 1, 1, 0 -> one disagreement in four
    assert churn(a, b) == 0.25
    first = 0.5 * (math.log(1 / 0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    expected = [first] + [jensenshannon(p, q) ** 2 for p, q in zip(a.numpy(), b.numpy())][1:]
    assert jensenshannon(a[0].numpy(), b[0].numpy()) ** 2 == pytest.approx(first)
    assert js_divergence(a, b) == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_pairwise_consistency_means_over_pairs() -> None:
    a = torch.eye(3)[[0, 0, 0, 0]]
    b = torch.eye(3)[[0, 0, 1, 1]]
    c = torch.eye(3)[[2, 2, 2, 2]]
    out = pairwise_consistency({"a": a, "b": b, "c": c})
    assert out["a vs b"]["churn"] == 0.5 and out["a vs c"]["churn"] == 1.0
    assert out["b vs c"]["churn"] == 1.0
    assert out["mean"]["churn"] == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError, match="at least two"):
        pairwise_consistency({"a": a})
