"""What a run writes before its first step: ``config.yaml``, ``header.json`` (git SHA, versions,
device, world size x per-device batch x accumulation = effective batch, kappa, the scaled
hyperparameters of every batch size) and the same, in a few lines, on the console."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from ssl_ema.config import Config, dump_yaml
from ssl_ema.data.datasets import DataBundle
from ssl_ema.data.synthetic_noise import describe_noise
from ssl_ema.engine.accelerator import precision_run
from ssl_ema.engine.posthoc import describe_text
from ssl_ema.engine.scaled import ScaledHyperparams
from ssl_ema.engine.tracking import device_name, git_sha, versions


def coverage_note(items: int, epoch_samples: Mapping[int, int], reference: int) -> str | None:
    """One warning line when a batch size covers another share of an epoch than the reference
    batch would. Every loader drops its last partial batch, so a run at kappa = 4 can see fewer
    samples than the kappa = 1 run it is compared with, while the EMA Scaling Rule matches runs
    at equal samples seen (Busbridge et al. 2023). ``items``: what an epoch passes over (for
    pseudo-labelling, groups of one labelled and mu unlabelled images); ``epoch_samples``:
    those one epoch covers at each effective batch."""
    ref = items // reference * reference
    off = {b: n for b, n in epoch_samples.items() if ref and abs(n - ref) > 0.01 * ref}
    if not off:
        return None
    worst = max(abs(n - ref) for n in off.values()) / ref
    at = ", ".join(f"{n:,} at batch {b}" for b, n in sorted(off.items()))
    return (f"warning: an epoch covers {ref:,} of {items:,} training items at the reference "
            f"batch {reference} but {at} (the last partial batch is dropped): samples seen "
            f"differ by up to {100 * worst:.1f}% from a run at the reference batch; make the "
            "number of training items a multiple of every batch size")


def run_header(cfg: Config, accelerator: Accelerator, student: nn.Module, data: DataBundle,
               first: ScaledHyperparams, scaled: Mapping[int, ScaledHyperparams],
               per_device: Mapping[int, int], steps: int, samples: int,
               epoch_samples: Mapping[int, int]) -> dict[str, Any]:
    """The header record: ``first`` is the first epoch's batch size; ``scaled``,
    ``per_device`` and ``epoch_samples`` (what one epoch covers) hold every batch size of the
    run, keyed by effective batch."""
    return {
        "git": git_sha(), "versions": versions(), "device": device_name(accelerator.device),
        "world_size": accelerator.num_processes, "per_device_batch": per_device[first.batch],
        "grad_accumulation": cfg.train.grad_accumulation,
        "effective_batch": first.batch, "mixed_precision": precision_run(accelerator),
        "reference_batch": cfg.scaling.reference_batch, "scaling_rule": cfg.scaling.rule,
        "kappa": first.kappa, "optimizer": cfg.optim.name,
        "scaled": [s.describe() for s in scaled.values()],
        "batch_schedule": [list(x) for x in cfg.train.batch_schedule],
        "ema": {"period": cfg.ema.period, "warmup": cfg.ema.warmup,
                "buffers": cfg.ema.buffers, "extra_momenta": list(cfg.ema.extra_momenta)},
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "train_images": len(data.train),  # type: ignore[arg-type]
        "skipped_unreadable_files": data.skipped_files,
        "label_noise": data.label_noise,
        "steps": steps, "samples": samples,
        "epoch_samples": {str(b): n for b, n in epoch_samples.items()},
    }


def header_text(h: dict[str, Any], scaled: Mapping[int, ScaledHyperparams],
                per_device: Mapping[int, int], data: DataBundle, run_dir: Path) -> str:
    """The console lines: versions and device, each batch size's split and scaled values."""
    lines = [f"ssl_ema {h['git']} | torch {h['versions']['torch']} | {h['device']}"]
    for b, s in scaled.items():
        lines.append(
            f"batch: {h['world_size']} processes x {per_device[b]} per device x "
            f"{h['grad_accumulation']} accumulation = {b} effective (reference "
            f"{h['reference_batch']}, kappa {s.kappa:g}, rule {h['scaling_rule']}: "
            f"momentum ** {s.momentum.update_exponent:g})")
        lines.append("  " + "; ".join(s.optimizer.describe()) + f" ({h['optimizer']})")
    if h.get("given"):
        lines.append("given from Python: " + ", ".join(f"{k} {v}" for k, v in h["given"].items()))
    if data.skipped_files:
        lines.append(f"left out {data.skipped_files} unreadable image files "
                     "(data.corrupt=skip)")
    if data.label_noise:
        lines.append(describe_noise(data.label_noise))
    if note := coverage_note(h["train_images"], {int(b): n for b, n in
                                                 h["epoch_samples"].items()},
                             h["reference_batch"]):
        lines.append(note)
    if h.get("posthoc_ema"):
        lines.append(describe_text(h["posthoc_ema"]))
    lines.append(f"{h['steps']} optimizer steps, {h['samples']} samples | run dir: {run_dir}")
    return "\n".join(lines)


def write_run_files(run_dir: Path, cfg: Config, h: dict[str, Any]) -> None:
    """``config.yaml`` (the resolved recipe, read back by ``--resume`` and ``tools/eval.py``)
    and ``header.json``; main process only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "header.json").write_text(json.dumps(h, indent=2) + "\n")
