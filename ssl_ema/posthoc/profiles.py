"""Power-function EMA profiles in samples seen: sigma_rel <-> gamma, inner products, least squares.

A power EMA of exponent gamma that ends at N samples seen weighs the student seen at sample n
with the density (Karras et al. 2024, "EDM2", Sec. 3.1 and App. C.1)

    p(n; N, gamma) = (gamma + 1) n^gamma / N^(gamma + 1)    for 0 < n <= N, else 0,

a profile that grows with training, whose width relative to its length, sigma_rel, is fixed.
Everything here is float64 and works on logarithms: N^(gamma + 1) overflows for a short EMA
(large gamma) at millions of samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ssl_ema.config_schema import MAX_SIGMA_REL


def gamma_to_sigma_rel(gamma: float) -> float:
    """Standard deviation of the profile over its length (EDM2, App. C.1)."""
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


def check_sigma_rel(sigma_rel: float) -> None:
    """A ValueError naming the valid range unless 0 < sigma_rel <= 1 / sqrt(12)."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0; "
                         f"{MAX_SIGMA_REL:.4f} is the uniform average), got {sigma_rel}")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma >= 0 whose profile has relative width ``sigma_rel``.

    EDM2 (App. C.1) takes the largest real root of the cubic sigma_rel^2 (g+2)^2 (g+3) = g+1;
    on gamma >= 0 the width falls strictly, and sigma_rel < 1 / (gamma + 2), so bisection on
    [0, 1 / sigma_rel] finds that root to the last bit without a polynomial solver.
    """
    check_sigma_rel(sigma_rel)
    low, high = 0.0, 1.0 / sigma_rel
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if gamma_to_sigma_rel(mid) > sigma_rel:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _as_float64(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def inner_products(ends_a: Sequence[float] | torch.Tensor, gammas_a: Sequence[float] | torch.Tensor,
                   ends_b: Sequence[float] | torch.Tensor, gammas_b: Sequence[float] | torch.Tensor,
                   ) -> torch.Tensor:
    """(len(a), len(b)) matrix of <p_a, p_b> = integral of p(n; N_a, g_a) p(n; N_b, g_b) dn.

    Closed form (EDM2, App. C.3): with N_a <= N_b the product lives on (0, N_a] and integrates to
    (g_a+1)(g_b+1) / (g_a+g_b+1) * (N_a / N_b)^g_b / N_b; symmetric otherwise.
    """
    na, ga = _as_float64(ends_a)[:, None], _as_float64(gammas_a)[:, None]
    nb, gb = _as_float64(ends_b)[None, :], _as_float64(gammas_b)[None, :]
    a_first = na <= nb
    shorter, longer = torch.where(a_first, na, nb), torch.where(a_first, nb, na)
    g_longer = torch.where(a_first, gb, ga)
    log_value = (torch.log(ga + 1) + torch.log(gb + 1) - torch.log(ga + gb + 1)
                 + g_longer * torch.log(shorter / longer) - torch.log(longer))
    return torch.exp(log_value)


def solve_coefficients(ends: Sequence[float], gammas: Sequence[float], end: float,
                       gamma: float) -> tuple[torch.Tensor, float]:
    """Least-squares weights x of the snapshots' profiles for the target profile (EDM2, Sec. 3.2).

    Minimises || sum_i x_i p_i - p_target ||^2 over functions of samples seen (EDM2, App. C.3:
    A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>), here subject to sum_i x_i = 1: every
    profile has mass one, and an unconstrained fit from few snapshots can miss it by several
    percent, which would scale the reconstructed weights; with the constraint a student that
    never moved is reconstructed exactly. Solved as the bordered (KKT) system by ``lstsq`` (SVD:
    the minimum-norm solution when two snapshots share a profile, where a plain solve fails),
    with lengths divided by ``end`` (x does not change; A's entries become O(gamma), like the
    border's ones). Returns x (float64) and the relative L2 error || fit - target || / || target ||.
    """
    scaled = _as_float64(ends) / end
    k = scaled.numel()
    A = inner_products(scaled, gammas, scaled, gammas)
    b = inner_products(scaled, gammas, [1.0], [gamma])
    kkt = torch.ones(k + 1, k + 1, dtype=torch.float64)
    kkt[:k, :k], kkt[k, k] = A, 0.0
    rhs = torch.cat([b, torch.ones(1, 1, dtype=torch.float64)])
    x = torch.linalg.lstsq(kkt, rhs, driver="gelsd").solution[:k]
    target = inner_products([1.0], [gamma], [1.0], [gamma])
    residual2 = (x.T @ A @ x - 2.0 * x.T @ b + target).item()
    return x.reshape(-1), math.sqrt(max(residual2, 0.0) / target.item())


def power_profile(samples: torch.Tensor, end: float, gamma: float) -> torch.Tensor:
    """p(n; end, gamma) at ``samples`` (float64; zero outside (0, end])."""
    n = samples.to(torch.float64)
    inside = (n > 0) & (n <= end)
    log_n = torch.log(torch.where(inside, n, torch.ones_like(n)))
    value = torch.exp(math.log(gamma + 1.0) + gamma * log_n - (gamma + 1.0) * math.log(end))
    return torch.where(inside, value, torch.zeros_like(value))


def combined_profile(samples: torch.Tensor, ends: Sequence[float], gammas: Sequence[float],
                     coefficients: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """sum_i x_i p(n; N_i, g_i) at ``samples``: the profile a reconstruction averages with."""
    total = torch.zeros(samples.shape, dtype=torch.float64)
    for end, gamma, x in zip(ends, gammas, _as_float64(coefficients).tolist()):
        total += x * power_profile(samples, end, gamma)
    return total
