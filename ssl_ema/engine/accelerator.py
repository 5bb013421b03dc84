"""The Accelerator of a run, and the backend settings that go with its device."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState

from ssl_ema.config import Config, ConfigError
from ssl_ema.engine.run import check_engine, cpu_processes


def build_accelerator(cfg: Config, run_dir: Path | None = None) -> Accelerator:
    """Accelerate with the recipe's precision and accumulation; seedable samplers (the data order
    is a function of seed and epoch, so a resume replays it); the trackers of ``run.log_with``,
    writing under ``run_dir`` (`ssl_ema.engine.trackers`)."""
    check_engine()  # tools/train.py checks first; this covers a Trainer built in a script
    check_precision(cfg)
    trackers = list(cfg.run.log_with)
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accumulation,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers or None,
        project_dir=str(run_dir) if trackers and run_dir is not None else None,
    )
    if accelerator.device.type == "cuda":
        # Fixed shapes: let cuDNN pick its fastest kernels; TF32 for the fp32 matmuls.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1; share this machine's cores instead,
        # unless SSL_EMA_CPU_THREADS says how many (on a machine other jobs load, threads
        # that wait for each other's cores make each step several times slower).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = int(os.environ.get("SSL_EMA_CPU_THREADS", "0"))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    return accelerator


def check_precision(cfg: Config) -> None:
    """Refuse ``train.mixed_precision=fp16`` on the CPU, before the Accelerator exists (its
    precision cannot change once set in a process): Accelerate turns fp16 autocast and the
    grad scaler on only off the CPU and would silently train in fp32 (accelerator.py,
    ``native_amp``). bf16 it does run on the CPU, with torch's CPU autocast."""
    if cfg.train.mixed_precision != "fp16":
        return
    device = PartialState(cpu=cpu_processes()).device
    if device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16: Accelerate has no fp16 autocast on the "
                          "CPU and would train in fp32; set it to bf16 (CPU autocast) or no, "
                          "or train on a GPU")


def precision_run(accelerator: Accelerator) -> str:
    """The precision the forward passes run in: Accelerate's setting where it autocasts."""
    return accelerator.mixed_precision if accelerator.native_amp else "no"
