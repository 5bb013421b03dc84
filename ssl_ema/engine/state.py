"""The counters of a run: with the seed they determine every schedule; saved in each checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Optimizer steps, samples seen and the position in the data; the baseline score."""

    step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    knn_random: float = -1.0  # baseline: the random-init student's score (kNN or top-1)
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss (train.nonfinite)

    def advance(self, micro_batches: int, images: int, epoch_batches: int, skipped: bool) -> None:
        """The one place the counters move: after an optimizer step (taken or ``skipped``) of
        ``micro_batches`` micro-batches holding ``images`` over all processes, in an epoch of
        ``epoch_batches`` micro-batches."""
        self.step += 1
        self.samples_seen += images
        self.skipped_steps += int(skipped)
        self.batch_in_epoch += micro_batches
        if self.batch_in_epoch == epoch_batches:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
