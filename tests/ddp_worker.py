"""Run under torchrun by test_multiprocess.py: train briefly, then compare every rank's models.

``given`` as the first override trains through the Python API (`ssl_ema.train`) on a backbone
module built on each rank from a different seed, as a script that seeds nothing would.

Writes ``<out>/ranks.json`` from rank 0: world size, counters, and the largest difference
between ranks of per-tensor checksums of the student, the teacher and the EMA copies; and from
every rank ``<out>/threads_<rank>.json``: the names of its threads once training was released.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from ssl_ema.config import load_config
from ssl_ema.engine.trainer import Trainer


def checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(2 * tensors,) float64: sum and sum of squares of every tensor."""
    rows = [t.detach().double() for t in tensors]
    sums = [f(t) for t in rows for f in (torch.sum, lambda x: (x * x).sum())]
    return torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64)


def thread_names() -> list[str]:
    """This process's OS threads by name (gloo's workers are ``pt_gloo_runloop``); Linux only."""
    tasks = Path("/proc/self/task")
    if not tasks.exists():
        return []
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


def main(out: Path, overrides: list[str]) -> None:
    if overrides[:1] == ["given"]:
        return given_backbone_run(out, overrides[1:])
    cfg = load_config(None, [f"run.output_dir={out}", *overrides])
    trainer = Trainer(cfg, out / "run")
    trainer.fit()
    rank = trainer.accelerator.process_index
    report(trainer, out, trainer.cfg.train.batch_size)
    # As ssl_ema/engine/launch.py's train: free the process group before interpreter exit.
    trainer.accelerator.end_training()
    del trainer
    gc.collect()
    (out / f"threads_{rank}.json").write_text(json.dumps(thread_names()))


def given_backbone_run(out: Path, overrides: list[str]) -> None:
    """Each rank writes ``<out>/<role>_<rank>.pt`` (ssl_ema.train has released the process
    group by the time it returns, so the ranks are compared from the files)."""
    import os

    from torch import nn

    import ssl_ema

    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # each rank its own initial weights
    backbone = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    run = ssl_ema.train(None, [f"run.output_dir={out}", *overrides], backbone=backbone,
                        num_features=16)
    model = run.trainer.model
    for role in ("teacher", "student"):
        state = getattr(model, role).state_dict()
        torch.save({k: v.cpu() for k, v in state.items()}, out / f"{role}_{rank}.pt")


def report(trainer: Trainer, out: Path, batch_size: int) -> None:
    """Gather every rank's checksums; rank 0 writes ranks.json and the student and teacher."""
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.method)
    modules = (model.student, model.teacher, *model.ema_copies)
    params = checksums([p for m in modules for p in m.parameters()])
    buffers = checksums([b for m in modules for b in m.buffers() if b.is_floating_point()])
    every_p = acc.gather(params.to(acc.device)[None]).cpu()  # (world, n)
    every_b = acc.gather(buffers.to(acc.device)[None]).cpu()
    if acc.is_main_process:
        result = {
            "world_size": acc.num_processes,
            "per_device_batch": trainer.per_device[batch_size],
            "step": trainer.state.step, "samples_seen": trainer.state.samples_seen,
            "ema_updates": trainer.ema.num_updates,
            "parameter_rank_difference": (every_p - every_p[0]).abs().max().item(),
            "buffer_rank_difference": (every_b - every_b[0]).abs().max().item(),
        }
        (out / "ranks.json").write_text(json.dumps(result))
        for role in ("teacher", "student"):
            state = getattr(model, role).state_dict()
            torch.save({k: v.cpu() for k, v in state.items()}, out / f"{role}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
