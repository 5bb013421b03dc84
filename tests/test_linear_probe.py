"""The logistic-regression probe: separable toys, and the optimum against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ssl_ema.data.labels import stratified_split
from ssl_ema.eval.linear import fit_logistic, train_linear_probe


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes: label = argmax of a fixed linear map of 16-d points, with a margin of 1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(99))
    x = 5 * torch.randn(4 * n, 16, generator=g) + 3.0  # offset and scale: standardisation matters
    scores = (x - 3.0) @ w.t()
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1.0
    return x[keep][:n], scores[keep][:n].argmax(1)


def test_probe_separates_a_separable_toy() -> None:
    x, y = separable(600, seed=0)
    x_test, y_test = separable(300, seed=1)
    probe, val_idx = train_linear_probe(x, y, num_classes=3)
    acc = (probe.logits(x_test).argmax(1) == y_test).double().mean().item()
    assert acc >= 0.98
    assert len(val_idx) == pytest.approx(60, abs=3)
    assert probe.val_accuracy[probe.weight_decay] == max(probe.val_accuracy.values())


def test_probe_is_chance_on_random_labels() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1000, 16, generator=g), torch.randint(0, 4, (1000,), generator=g)
    x_test, y_test = torch.randn(2000, 16, generator=g), torch.randint(0, 4, (2000,), generator=g)
    probe, _ = train_linear_probe(x, y, num_classes=4)
    acc = (probe.logits(x_test).argmax(1) == y_test).double().mean().item()
    assert abs(acc - 0.25) < 0.04


def test_lbfgs_reaches_scikit_learns_optimum() -> None:
    """Same objective as sklearn's multinomial L2 logistic regression with C = 1 / (wd N)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    y = (x[:, :3] + 0.8 * torch.randn(300, 3, generator=g, dtype=torch.float64)).argmax(1)
    wd = 1e-2
    w, b = fit_logistic(x, y, 3, wd)
    ref = LogisticRegression(C=1 / (wd * 300), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    # sklearn's multinomial parameters are defined up to a shift shared by all classes (softmax
    # invariance; the unpenalised bias absorbs it): compare centred logits.
    ours = (x @ w.t() + b).numpy()
    theirs = ref.decision_function(x.numpy())
    np.testing.assert_allclose(ours - ours.mean(1, keepdims=True),
                               theirs - theirs.mean(1, keepdims=True), atol=1e-4)


def test_stratified_split_holds_out_each_class() -> None:
    """The probe's split (``min_per_class=1``): 10 % of each class, at least one image of a
    class of 3 (10 % rounds to none), none of a singleton class."""
    y = np.array([0] * 50 + [1] * 30 + [2] * 3 + [3])
    train, val = stratified_split(y, 0.1, seed=0, min_per_class=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(84))
    assert np.bincount(y[val], minlength=4).tolist() == [5, 3, 1, 0]
    assert np.bincount(y[stratified_split(y, 0.1, seed=0)[1]], minlength=4).tolist() == \
        [5, 3, 0, 0]  # the classification runs' validation split (labels.val_fraction)
