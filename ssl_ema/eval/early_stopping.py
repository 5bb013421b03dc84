"""EMA early stopping (Morales-Brotons et al. 2024): the best (EMA, epoch) on a validation split.

Every evaluation offers each EMA model (teacher and copies, with and without BatchNorm
recomputation) and the last iterate; the best EMA and the best last iterate on validation
accuracy are kept, with their test accuracy at that epoch (reported, never used to choose).
The best EMA's weights (backbone + classifier, with the BatchNorm statistics it was evaluated
with) are written to ``best_ema.safetensors`` beside ``best_ema.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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

    def offer(self, choice: Choice, state: dict[str, torch.Tensor] | None = None) -> bool:
        """Keep ``choice`` if it beats the best of its kind (earlier wins ties); save weights."""
        kind = "student" if choice.model == "student" else "ema"
        current = self.best.get(kind)
        if current is not None and choice.val <= current.val:
            return False
        self.best[kind] = choice
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
