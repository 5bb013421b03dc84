"""Post-hoc EMA: choose the EMA length after training, from snapshots, in samples seen.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2,
CVPR 2024), Sec. 3 and App. C: track power-function EMAs (profile ~ n^gamma, named by their
relative width sigma_rel), store snapshots of them at intervals, and after training form the
EMA of any sigma_rel as the least-squares combination of the snapshots, whose profiles have
closed-form inner products.

Modules: `profiles` (sigma_rel <-> gamma, profiles, inner products, the least-squares solve),
`power_ema` (the averages, updated by samples seen), `snapshots` (safetensors files, atomic,
their disk cost), `reconstruct` (combination weights and reconstructed state dicts),
`tracker` (`PostHocEMA`, the interface of a training loop).

Sources. Implemented from the paper. NVlabs' reference code is CC BY-NC-SA, incompatible with
this Apache-2.0 package, and was not read. lucidrains' ema-pytorch (MIT) has a ``PostHocEMA``;
it was read for comparison, not used, because its design differs where this project needs:
- it counts optimizer steps (beta = (1 - 1/t)^(gamma + 1) with t the step), so its profile
  moves with the batch size; here t is samples seen (see `power_ema`), batch-size invariant and
  exact under a batch schedule;
- it solves the normal equations with ``linalg.solve``, which fails on a singular Gram matrix;
  EDM2 (App. C.3) fits by least squares, as ``lstsq`` does here (minimum-norm solution);
- one deviation from EDM2 as well: the fit is constrained to weights summing to one (see
  `profiles.solve_coefficients`), so a reconstruction is an average even from few snapshots;
- its inner products raise times to the power gamma; here they are ratios in log space, so a
  short EMA (large gamma) at millions of samples does not overflow;
- its snapshots are pickled ``torch.save`` files whose EMA and step live in the file name;
  here they are safetensors files, written atomically, with samples seen, sigma_rel, gamma and
  dtype in their metadata, read with no unpickler.
"""

from ssl_ema.posthoc.power_ema import PowerEMA
from ssl_ema.posthoc.profiles import MAX_SIGMA_REL, gamma_to_sigma_rel, sigma_rel_to_gamma
from ssl_ema.posthoc.reconstruct import Reconstruction, reconstruct, solve_reconstruction
from ssl_ema.posthoc.snapshots import (
    SNAPSHOT_DTYPES,
    Snapshot,
    SnapshotWriteError,
    disk_usage,
    list_snapshots,
    read_snapshot,
)
from ssl_ema.posthoc.tracker import PostHocEMA

__all__ = [
    "MAX_SIGMA_REL", "SNAPSHOT_DTYPES", "PostHocEMA", "PowerEMA", "Reconstruction", "Snapshot",
    "SnapshotWriteError", "disk_usage", "gamma_to_sigma_rel", "list_snapshots", "read_snapshot",
    "reconstruct", "sigma_rel_to_gamma", "solve_reconstruction",
]
