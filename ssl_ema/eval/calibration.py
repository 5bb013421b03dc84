"""Calibration of a classifier's probabilities: ECE, NLL, Brier score, temperature scaling.

- **ECE with equal-mass bins** (Nixon et al. 2019, "Measuring Calibration in Deep Learning",
  Sec. 4: adaptive binning; Morales-Brotons et al. 2024 report it with 100 bins to compare EMA and
  SGD models): sort by confidence, split into bins holding the same number of predictions, and
  average |accuracy - confidence| weighted by bin size. Equal-width bins (Guo et al. 2017) leave
  most bins empty when confidences pile up near 1, so their estimate depends on a few bins.
- **NLL** and the **Brier score** (Brier 1950: sum over classes of (p_c - 1[y = c])^2, averaged
  over samples; in [0, 2]) are proper scoring rules: they reward calibration and accuracy.
- **Temperature scaling** (Guo et al. 2017, Sec. 4.2): one scalar T > 0 dividing the logits,
  fitted on held-out data by minimising NLL; it changes confidence, never the predicted class.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

ECE_BINS = (15, 100)


def equal_mass_bins(confidence: torch.Tensor, n_bins: int) -> list[torch.Tensor]:
    """Indices of ``n_bins`` bins of (nearly) equal size, in order of increasing confidence."""
    order = torch.argsort(confidence, stable=True)
    return [b for b in torch.tensor_split(order, n_bins) if len(b)]


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
                               ) -> float:
    """Top-label ECE of ``probs (N, C)`` with equal-mass bins."""
    confidence, pred = probs.max(1)
    correct = (pred == labels).to(probs.dtype)
    n = len(labels)
    return sum(len(b) / n * abs(correct[b].mean() - confidence[b].mean()).item()
               for b in equal_mass_bins(confidence, n_bins))


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return F.cross_entropy(logits.double(), labels).item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(1).mean().item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising NLL(logits / T) on held-out data; optimised over log T (T stays > 0)."""
    z, y = logits.double().detach(), labels
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, ECE (each of ``ECE_BINS``, equal mass), NLL and Brier of ``logits (N, C)``."""
    logits, labels = logits.double().cpu(), labels.long().cpu()
    probs = logits.softmax(1)
    out = {"accuracy": (probs.argmax(1) == labels).double().mean().item()}
    out.update({f"ece_{n}": expected_calibration_error(probs, labels, n) for n in ECE_BINS})
    out["nll"] = negative_log_likelihood(logits, labels)
    out["brier"] = brier_score(probs, labels)
    return out


def calibration_report(test_logits: torch.Tensor, test_labels: torch.Tensor,
                       val_logits: torch.Tensor, val_labels: torch.Tensor) -> dict[str, float]:
    """Metrics on test before and after temperature scaling fitted on validation.

    The entry point for any classifier: linear probes here, supervised/EMA models later.
    Keys: ``accuracy, ece_15, ece_100, nll, brier``, the same with ``_ts`` after scaling, and
    ``temperature``.
    """
    t = fit_temperature(val_logits.cpu(), val_labels.long().cpu())
    out = calibration_metrics(test_logits, test_labels)
    scaled = calibration_metrics(test_logits.double() / t, test_labels)
    out.update({f"{k}_ts": v for k, v in scaled.items() if k != "accuracy"})
    out["temperature"] = t
    return out


def reliability_diagram(curves: dict[str, torch.Tensor], labels: torch.Tensor, path: Path,
                        n_bins: int = 15, title: str = "") -> None:
    """PNG: accuracy against confidence per equal-mass bin, one line per model (``name -> probs``).

    A calibrated model lies on the diagonal; points below it are over-confident bins.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, probs in curves.items():
        confidence, pred = probs.max(1)
        correct = (pred == labels).to(probs.dtype)
        bins = equal_mass_bins(confidence, n_bins)
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot([confidence[b].mean().item() for b in bins],
                [correct[b].mean().item() for b in bins], marker="o", markersize=3,
                label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=title or f"reliability, {n_bins} equal-mass bins")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
