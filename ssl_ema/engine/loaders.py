"""The loaders of a run: each effective batch split over processes and accumulation, one training
loader per batch size of ``train.batch_schedule``, and the evaluation loaders."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ssl_ema.config import Config, ConfigError
from ssl_ema.data.datasets import DataBundle, build_data
from ssl_ema.data.device import TrainStream, device_streams
from ssl_ema.data.jpeg import JpegTrainStream, jpeg_streams
from ssl_ema.eval.context import EVAL_BATCH
from ssl_ema.methods.registry import method_data

Stream = TrainStream | JpegTrainStream  # batches made on the device, resumed by `iter_from`
TrainBatches = DataLoader | Stream


def build_run_data(cfg: Config, given: DataBundle | None = None) -> DataBundle:
    """The run's data: the method looked up once, its views, labels and unlabelled stream handed
    to `ssl_ema.data.datasets.build_data` (the data code reads no method registry)."""
    return build_data(cfg, method_data(cfg), given)


def per_device_batch(cfg: Config, world_size: int, batch: int | None = None) -> int:
    """Split an effective batch over processes and accumulation; error if it does not divide."""
    batch = cfg.train.batch_size if batch is None else batch
    div = world_size * cfg.train.grad_accumulation
    if batch % div:
        raise ConfigError(
            f"effective batch {batch} is not divisible by world size {world_size} "
            f"x train.grad_accumulation {cfg.train.grad_accumulation}; pick a multiple of {div}"
        )
    return batch // div


def worker_warning(num_workers: int, processes_here: int) -> str:
    """A line when the loader workers of this machine's processes outnumber its cores ("" if
    not): a worker then takes a core from training, and on a CPU run from the step itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cores or num_workers * processes_here <= cores:
        return ""
    return (f"warning: data.num_workers={num_workers} x {processes_here} processes exceeds the "
            f"{cores} CPU cores here; the workers compete with training for them (lower "
            "data.num_workers; data.pipeline=device needs them only to decode once)")


def build_loaders(data: DataBundle, cfg: Config, per_device: Mapping[int, int]
                  ) -> tuple[list[DataLoader], DataLoader, DataLoader]:
    """(a training loader per effective batch, in ``per_device``'s order; the bank loader of
    training images with the evaluation transform; the query loader of test images)."""
    workers = cfg.data.num_workers
    common: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0,
                              "pin_memory": torch.cuda.is_available()}
    train = []
    for b, per_device_b in per_device.items():
        loader = DataLoader(data.train, batch_size=per_device_b, shuffle=True, drop_last=True,
                            **common)
        if len(loader) == 0:
            raise ConfigError(
                f"batch {b} exceeds the {len(data.train)} training images; lower it"  # type: ignore[arg-type]
            )
        train.append(loader)
    bank = DataLoader(data.train_eval, batch_size=EVAL_BATCH, **common)
    query = DataLoader(data.test_eval, batch_size=EVAL_BATCH, **common)
    return train, bank, query


def val_loader(data: DataBundle, cfg: Config) -> DataLoader | None:
    """The validation split of a classification run (EMA early stopping), if it has one."""
    if data.val_eval is None:
        return None
    return DataLoader(data.val_eval, batch_size=EVAL_BATCH, num_workers=cfg.data.num_workers)


class Prepared(NamedTuple):
    method: nn.Module  # wrapped for the process group (DDP) where there is one
    optimizer: torch.optim.Optimizer
    train: dict[int, TrainBatches]  # by effective batch
    bank: Iterable[Any]
    query: Iterable[Any]
    val: Iterable[Any] | None


def prepare(accelerator: Accelerator, method: nn.Module, optimizer: torch.optim.Optimizer,
            data: DataBundle, cfg: Config, per_device: Mapping[int, int]) -> Prepared:
    """The model, optimizer and loaders through ``accelerator.prepare``. Under
    ``data.pipeline=device`` the data is already on the device and sharded: nothing for
    Accelerate to wrap there. Under ``data.pipeline=jpeg`` the training batches are decoded
    on the device from each rank's own share; evaluation stays with the loaders."""
    if cfg.data.pipeline == "jpeg":
        _, bank, query = build_loaders(data, cfg, {})
        method, optimizer, bank, query = accelerator.prepare(method, optimizer, bank, query)
        train = jpeg_streams(data, cfg, dict(per_device), accelerator.device,
                             accelerator.process_index, accelerator.num_processes)
        for b, stream in train.items():
            if len(stream) == 0:
                raise ConfigError(f"batch {b} exceeds the {len(data.train)} training images; "
                                  "lower it")
    elif cfg.data.pipeline == "device":
        method, optimizer = accelerator.prepare(method, optimizer)
        train, bank, query, val = device_streams(data, cfg, dict(per_device), accelerator.device,
                                                 accelerator.process_index,
                                                 accelerator.num_processes)
        return Prepared(method, optimizer, dict(train), bank, query, val)
    else:
        loaders, bank, query = build_loaders(data, cfg, per_device)
        method, optimizer, bank, query, *loaders = accelerator.prepare(
            method, optimizer, bank, query, *loaders)
        train = dict(zip(per_device, loaders))
    val = val_loader(data, cfg)
    return Prepared(method, optimizer, dict(train), bank, query,
                    None if val is None else accelerator.prepare(val))
