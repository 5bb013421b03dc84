"""`PostHocEMA`: what a training loop holds to choose the EMA length after training.

The power EMAs (`power_ema`) plus their snapshots (`snapshots`) every ``interval`` samples seen,
behind three calls: :meth:`PostHocEMA.step` after every optimizer step, :meth:`PostHocEMA.finish`
at the end, ``state_dict`` / ``load_state_dict`` for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ssl_ema.posthoc.power_ema import PowerEMA
from ssl_ema.posthoc.snapshots import (
    SnapshotWriteError,
    check_interval,
    discard_after,
    list_snapshots,
    payload_bytes,
    snapshot_dtype,
    snapshot_due,
    write_snapshot,
)


class PostHocEMA:
    """Power EMAs of ``student`` at ``sigma_rels``, stored in ``folder`` every ``interval`` samples.

    Every process may hold one (all see the same student); only the one with ``write`` touches
    the folder. With several processes, ``agree(ok)`` says whether every process's ``ok`` was
    True (a collective every process calls at the same points: each due snapshot and the end),
    so that a snapshot the writer could not store stops every process at the same step, not
    the writer alone while the others wait in the next step's all-reduce.
    """

    def __init__(self, student: Mapping[str, torch.Tensor], sigma_rels: Sequence[float],
                 folder: Path, interval: int, dtype: str = "fp32", write: bool = True,
                 agree: Callable[[bool], bool] | None = None):
        snapshot_dtype(dtype)  # fail before training, not at the first snapshot
        check_interval(interval)
        self.ema = PowerEMA(student, sigma_rels)
        self.folder, self.interval, self.dtype, self.write = folder, interval, dtype, write
        self.agree = agree

    def step(self, samples_seen: int) -> list[Path]:
        """After an optimizer step: update with the samples seen after it; snapshot when due."""
        previous = self.ema.samples_seen
        self.ema.update(samples_seen)
        if snapshot_due(previous, samples_seen, self.interval):
            return self._agreed(self.snapshot)
        return []

    def snapshot(self) -> list[Path]:
        """Store every power EMA as it is now (one file each)."""
        if not self.write or self.ema.samples_seen == 0:
            return []
        return [write_snapshot(self.folder, self.ema.average(i),
                               samples_seen=self.ema.samples_seen, sigma_rel=sigma_rel,
                               gamma=gamma, index=i, dtype=self.dtype)
                for i, (sigma_rel, gamma) in enumerate(zip(self.ema.sigma_rels, self.ema.gammas))]

    def finish(self) -> list[Path]:
        """At the end of training: store the final averages unless the last step just did."""
        def unless_stored() -> list[Path]:
            if not self.write:
                return []
            stored = {(s.samples_seen, s.sigma_rel) for s in list_snapshots(self.folder)}
            now = {(self.ema.samples_seen, sigma_rel) for sigma_rel in self.ema.sigma_rels}
            return [] if now <= stored else self.snapshot()
        return self._agreed(unless_stored)

    def _agreed(self, write: Callable[[], list[Path]]) -> list[Path]:
        """``write()``; then every process learns whether it failed anywhere, and raises."""
        written: list[Path] = []
        error: SnapshotWriteError | None = None
        try:
            written = write()
        except SnapshotWriteError as e:
            error = e
        if self.agree is not None and not self.agree(error is None):
            raise error or SnapshotWriteError(
                f"the main process could not write a post-hoc EMA snapshot in {self.folder} "
                "(its own error line says why); free space or make it writable, then resume")
        if error is not None:
            raise error
        return written

    def bytes_per_snapshot(self) -> int:
        """Disk cost of one snapshot of every tracked EMA (tensors only, without headers)."""
        return len(self.ema.sigma_rels) * payload_bytes(self.ema.average(0), self.dtype)

    def projected_bytes(self, total_samples: int) -> int:
        """Disk cost of a run of ``total_samples``: its snapshots at the interval and the end."""
        count = total_samples // self.interval + (total_samples % self.interval != 0)
        return count * self.bytes_per_snapshot()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the averages; snapshots past them belong to the interrupted future: removed."""
        self.ema.load_state_dict(state)
        if self.write:
            discard_after(self.folder, self.ema.samples_seen)
