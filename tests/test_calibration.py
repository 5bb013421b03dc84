"""Calibration metrics on toys whose values are known by construction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssl_ema.eval.calibration import (
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_diagram,
)


def binary(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (N, 2) predicting class 0 with ``confidence``; label 0 where ``correct``."""
    confidence = confidence.double()
    probs = torch.stack([confidence, 1 - confidence], 1)
    return probs, (~correct).long()


def test_ece_is_zero_for_a_perfectly_calibrated_toy() -> None:
    # 10 predictions at confidence 0.6 (6 right) and 10 at 0.9 (9 right): two equal-mass bins,
    # each with accuracy == confidence.
    conf = torch.tensor([0.6] * 10 + [0.9] * 10, dtype=torch.float64)
    correct = torch.tensor([True] * 6 + [False] * 4 + [True] * 9 + [False])
    probs, labels = binary(conf, correct)
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.0, abs=1e-12)
    # One bin mixes them: |0.75 - 0.75| is still 0; a confident, always-wrong model has ECE 1.
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.0, abs=1e-12)
    wrong, wrong_labels = binary(torch.full((8,), 1.0), torch.zeros(8, dtype=torch.bool))
    assert expected_calibration_error(wrong, wrong_labels, 15) == pytest.approx(1.0)


def test_ece_of_sampled_toys_calibrated_and_overconfident() -> None:
    g = torch.Generator().manual_seed(0)
    conf = 0.55 + 0.45 * torch.rand(200_000, generator=g, dtype=torch.float64)
    u = torch.rand(200_000, generator=g, dtype=torch.float64)
    calibrated = binary(conf, u < conf)
    overconfident = binary(conf, u < conf - 0.1)  # accuracy 0.1 below confidence everywhere
    # A calibrated model's ECE is not 0 but the sampling noise of bin accuracies:
    # ~ sqrt(p (1 - p) bins / N) = 0.003 at 15 bins and 0.008 at 100 (Nixon et al. 2019, Sec. 4).
    for bins, noise in ((15, 0.006), (100, 0.012)):
        assert expected_calibration_error(*calibrated, bins) < noise
        assert expected_calibration_error(*overconfident, bins) == pytest.approx(0.1, abs=noise)


def test_nll_and_brier_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # Brier (1950): sum over classes, mean over samples.
    expected = ((0.3**2 + 0.2**2 + 0.1**2) + (0.25**2 + 0.75**2 + 0.5**2)) / 2
    assert brier_score(probs, labels) == pytest.approx(expected)
    assert negative_log_likelihood(probs.log(), labels) == pytest.approx(
        -(math.log(0.7) + math.log(0.25)) / 2)


def test_temperature_scaling_recovers_the_temperature() -> None:
    """Labels drawn from softmax(z); a model reporting 3z is over-confident by T = 3 exactly."""
    g = torch.Generator().manual_seed(1)
    z = 1.5 * torch.randn(40_000, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(z.softmax(1), 1, generator=g).flatten()
    val, test = slice(0, 20_000), slice(20_000, None)
    assert fit_temperature(3 * z[val], labels[val]) == pytest.approx(3.0, rel=0.03)
    report = calibration_report(3 * z[test], labels[test], 3 * z[val], labels[val])
    assert report["nll_ts"] < report["nll"] and report["brier_ts"] < report["brier"]
    assert report["ece_15_ts"] < 0.01 < report["ece_15"]
    # the calibrated logits' own test NLL: temperature scaling reaches it
    assert report["nll_ts"] == pytest.approx(negative_log_likelihood(z[test], labels[test]),
                                             rel=2e-3)


def test_reliability_diagram_writes_a_png(tmp_path: Path) -> None:
    probs, labels = binary(torch.tensor([0.6] * 10 + [0.9] * 10),
                           torch.tensor([True] * 6 + [False] * 4 + [True] * 9 + [False]))
    path = tmp_path / "r.png"
    reliability_diagram({"toy": probs}, labels, path, n_bins=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
