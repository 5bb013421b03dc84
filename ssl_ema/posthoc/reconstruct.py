"""Any EMA length after training: a least-squares combination of snapshots (EDM2, Sec. 3.2).

Every snapshot is the student averaged with a known profile p(n; N_i, gamma_i), so a weighted
sum of snapshots is the student averaged with sum_i x_i p_i. :func:`solve_reconstruction`
chooses the x_i (summing to one) that bring that profile closest, in L2 over samples seen, to
the requested power profile ending at the newest snapshot used; :func:`reconstruct` forms the
weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssl_ema.posthoc.profiles import (
    check_sigma_rel,
    combined_profile,
    power_profile,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from ssl_ema.posthoc.snapshots import Snapshot, read_snapshot


@dataclass(frozen=True)
class Reconstruction:
    """How to form the EMA of ``sigma_rel`` ending at ``samples_seen`` from ``snapshots``."""

    sigma_rel: float
    gamma: float
    samples_seen: int  # where the reconstructed profile ends: the newest snapshot used
    snapshots: tuple[Snapshot, ...]
    coefficients: tuple[float, ...]
    profile_error: float  # || fitted profile - requested profile || / || requested profile ||

    def profile(self, samples: torch.Tensor) -> torch.Tensor:
        """Weight per sample of the reconstruction at ``samples`` seen (float64)."""
        return combined_profile(samples, [s.samples_seen for s in self.snapshots],
                                [s.gamma for s in self.snapshots], self.coefficients)

    def target(self, samples: torch.Tensor) -> torch.Tensor:
        """Weight per sample of the requested power EMA at ``samples`` seen (float64)."""
        return power_profile(samples, self.samples_seen, self.gamma)


def solve_reconstruction(snapshots: Sequence[Snapshot], sigma_rel: float,
                         up_to: int | None = None) -> Reconstruction:
    """The combination of ``snapshots`` (those at most ``up_to`` samples seen) for ``sigma_rel``.

    The requested profile ends at the newest snapshot used: after it nothing was stored, so a
    later end could only be extrapolated.
    """
    check_sigma_rel(sigma_rel)
    used = tuple(s for s in snapshots if up_to is None or s.samples_seen <= up_to)
    if not used:
        first = min((s.samples_seen for s in snapshots), default=None)
        have = f"the first is at {first}" if first is not None else "there are none"
        where = f"at or before {up_to} samples seen" if up_to is not None else "given"
        raise ValueError(f"no post-hoc EMA snapshot {where} ({have}): ask for a later point "
                         "or train with ema.posthoc on")
    end = max(s.samples_seen for s in used)
    gamma = sigma_rel_to_gamma(sigma_rel)
    x, error = solve_coefficients([s.samples_seen for s in used], [s.gamma for s in used],
                                  end, gamma)
    return Reconstruction(sigma_rel, gamma, end, used, tuple(x.tolist()), error)


@torch.no_grad()
def reconstruct(plan: Reconstruction, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """sum_i x_i snapshot_i, read one snapshot at a time, accumulated in float64.

    The coefficients of a close fit alternate in sign and can be large; a float64 sum keeps
    their cancellation from eating the snapshots' own precision.
    """
    total: dict[str, torch.Tensor] = {}
    for snapshot, x in zip(plan.snapshots, plan.coefficients):
        tensors = read_snapshot(snapshot, device)
        shapes = {name: t.shape for name, t in tensors.items()}
        if total and shapes != {name: t.shape for name, t in total.items()}:
            raise ValueError(f"{snapshot.path} holds other tensors than "
                             f"{plan.snapshots[0].path}: snapshots of two different models")
        for name, t in tensors.items():
            if name not in total:
                total[name] = torch.zeros(t.shape, dtype=torch.float64, device=device)
            total[name].add_(t.to(torch.float64), alpha=x)
    return {name: t.to(dtype) for name, t in total.items()}
