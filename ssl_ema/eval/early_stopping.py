"""EMA early stopping (Morales-Brotons et al. 2024): the best (EMA, epoch) on a validation split.

Every evaluation offers each EMA model (teacher and copies, with and without BatchNorm
recomputation) and the last iterate; the best EMA and the best last iterate on validation
accuracy are kept, with their test accuracy at that epoch (reported, never used to choose).
The best EMA's weights (backbone + classifier, with the BatchNorm statistics it was evaluated
with) are written to ``best_ema.safetensors`` beside ``best_ema.json``, and both choices' test
predictions to ``best_predictions.json``: churn, the share of test images on which two runs that
differ only in their seed disagree (Morales-Brotons et al. 2024, Sec. 6), needs them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

PREDICTIONS_FILE = "best_predictions.json"


def encode_predictions(predicted: torch.Tensor) -> str:
    """Class indices ``(N,)`` as base64 of little-endian int16 (a 10,000-image test set: 27 kB)."""
    return base64.b64encode(predicted.cpu().numpy().astype("<i2").tobytes()).decode("ascii")


def decode_predictions(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i2").astype(np.int64)


@dataclass(frozen=True)
class Choice:
    model: str  # "teacher", "ema_<momentum>" or "student"
    bn_recomputed: bool
    epoch: int
    step: int
    val: float
    test: float


class BestModel:
    """The best EMA and the best last iterate seen so far, on validation accuracy."""

    def __init__(self, run_dir: Path, write: bool):
        self.run_dir, self.write = run_dir, write
        self.best: dict[str, Choice] = {}  # "ema" and "student"

    def offer(self, choice: Choice, state: dict[str, torch.Tensor] | None = None,
              predicted: torch.Tensor | None = None) -> bool:
        """Keep ``choice`` if it beats the best of its kind (earlier wins ties); save weights
        and its test predictions ``predicted (N,)``."""
        kind = "student" if choice.model == "student" else "ema"
        current = self.best.get(kind)
        if current is not None and choice.val <= current.val:
            return False
        self.best[kind] = choice
        if self.write and predicted is not None:
            self._save_predictions(kind, choice, predicted)
        if kind == "ema" and self.write and state is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, str(self.run_dir / "best_ema.safetensors"),
                      metadata={k: str(v) for k, v in asdict(choice).items()})
            (self.run_dir / "best_ema.json").write_text(json.dumps(asdict(choice), indent=2))
        return True

    def state_dict(self) -> dict[str, Any]:
        return {kind: asdict(c) for kind, c in self.best.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = {kind: Choice(**c) for kind, c in state.items()}

    def _save_predictions(self, kind: str, choice: Choice, predicted: torch.Tensor) -> None:
        path = self.run_dir / PREDICTIONS_FILE
        saved = json.loads(path.read_text()) if path.is_file() else {}
        saved[kind] = {**asdict(choice), "test_predictions": encode_predictions(predicted)}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(saved))
        tmp.replace(path)
