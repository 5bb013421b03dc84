"""Linear probe on frozen features: multinomial logistic regression, L2 penalty chosen on a
validation split.

The protocol of Kornblith et al. (2019, "Do Better ImageNet Models Transfer Better?", Sec. 3)
and of the CLIP linear probes (Radford et al. 2021, App. A.3): standardised features, full-batch
L-BFGS on the convex cross-entropy, the regularisation strength swept over a log grid and picked
on a held-out part of the training set. On cached features this takes seconds on a CPU and
well under a second on a GPU, for any N that fits in memory (CIFAR: 50k x 512).

The probe is *not* refitted on train + validation: the validation split is kept unseen so that
temperature scaling (``calibration.py``) can be fitted on it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_ema.data.labels import stratified_split

DEFAULT_WEIGHT_DECAYS = tuple(10.0 ** e for e in range(-6, 1))  # 1e-6 ... 1
# Below this many feature values a CPU fit runs on one thread: L-BFGS spends its time in tiny
# vector ops (its two-loop recursion: ~40 dot products an iteration), where BLAS threads only
# add synchronisation (docs/RESULTS.md, "Evaluation cost").
SINGLE_THREAD_BELOW = 1 << 22


@dataclass
class LinearProbe:
    """``logits = ((x - mean) / std) @ weight.T + bias``, fitted with the chosen weight decay."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    weight_decay: float
    val_accuracy: dict[float, float]  # the sweep: weight decay -> validation accuracy
    val_nll: dict[float, float]  # ... and validation NLL (breaks ties in accuracy)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.mean) - self.mean) / self.std
        return x @ self.weight.t() + self.bias  # (N, C)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 500
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(C, D)`` and bias ``(C,)`` minimising mean cross-entropy + wd/2 ||W||^2.

    Full-batch L-BFGS with a strong-Wolfe line search: the objective is smooth and strictly
    convex for wd > 0, so the optimum is unique and does not depend on a learning rate or an
    epoch budget (unlike SGD probes). ``init`` warm-starts from a neighbouring wd of the sweep.
    """
    d = x.shape[1]
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device) if init is None \
        else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None \
        else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


@contextmanager
def _cpu_threads_for(x: torch.Tensor) -> Iterator[None]:
    threads = torch.get_num_threads()
    small = x.device.type == "cpu" and x.numel() < SINGLE_THREAD_BELOW
    torch.set_num_threads(1 if small else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, negative NLL) on validation: larger is better for both."""
    return (logits.argmax(1) == y).double().mean().item(), -F.cross_entropy(logits, y).item()


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS,
                       val_fraction: float = 0.1, seed: int = 0, max_iter: int = 100
                       ) -> tuple[LinearProbe, torch.Tensor]:
    """Fit on the training part of ``features (N, D)``; pick wd by validation accuracy.

    Returns the probe and the validation indices (for temperature scaling). Ties in accuracy
    (frequent: a validation split of a few hundred images moves in steps of 1/n) go to the
    lower validation NLL. Runs in float64 on the features' device:
    L-BFGS's stopping tests are then not limited by rounding. ``max_iter`` L-BFGS iterations per
    weight decay: warm-started, the strong ones converge well within it; on separable features
    the weakest ones would need thousands to approach their (huge-norm) optimum, and their
    validation accuracy has long stopped changing by then.
    """
    x, y = features.double(), labels.to(features.device).long()
    train_idx, val_idx = (torch.from_numpy(i).to(x.device) for i in
                          stratified_split(y.cpu().numpy(), val_fraction, seed, min_per_class=1))
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0).clamp_min(1e-6)  # constant features (dead ReLUs) stay at 0
    z = (x - mean) / std
    sweep: dict[float, tuple[float, float]] = {}
    params: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    init = None
    for wd in sorted(weight_decays, reverse=True):  # strong -> weak: each warm-starts the next
        with _cpu_threads_for(z):
            init = fit_logistic(z[train_idx], y[train_idx], num_classes, wd, init, max_iter)
        params[wd] = init
        sweep[wd] = _scores(z[val_idx] @ init[0].t() + init[1], y[val_idx])
    best = max(sweep, key=lambda wd: sweep[wd])
    w, b = params[best]
    ordered = sorted(sweep.items())
    probe = LinearProbe(mean, std, w, b, best, {wd: acc for wd, (acc, _) in ordered},
                        {wd: -neg_nll for wd, (_, neg_nll) in ordered})
    return probe, val_idx
