"""The data set held on the accelerator as uint8, views made there (``data.pipeline=device``).

CIFAR-10 is 150 MB as uint8: decoded once and kept in GPU memory, a training batch is an index
gather plus the batched ops of `gpu_augment` (the classification methods' weak and strong views:
`device_classify`), with no loader workers, no host-to-device copy and no host sync. The
loader pipeline (``data.pipeline=loader``: DataLoader workers running lightly's transforms)
stays for data sets that do not fit or whose images differ in size.

Order and views are functions of (seed, epoch, sample index), as in the loader pipeline: the
epoch's permutation and every sample's view parameters are drawn at `set_epoch`. Under several
processes, step s of an epoch covers the same samples as with one process at the same effective
batch; rank r takes the r-th chunk of it. Evaluation images are small and held whole on every
process (no gather).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2 import functional as TF

from ssl_ema.config_schema import Config
from ssl_ema.data import gpu_augment
from ssl_ema.data.datasets import DataBundle, DataError
from ssl_ema.data.device_classify import ClassifyStream, classify_streams
from ssl_ema.data.gpu_augment import ViewParams, ViewSpec
from ssl_ema.data.method_data import MethodData
from ssl_ema.data.uint8 import check_fits, decode_uint8


def view_specs(method: MethodData | None) -> tuple[ViewSpec, ...]:
    """The method's view distributions on the device (config_checks refuses
    data.pipeline=device for a method that has none)."""
    if method is None or method.device_views is None:
        name = "this method" if method is None else f"method {method.name}"
        raise DataError(f"{name} has no device-pipeline views; use data.pipeline=loader")
    return method.device_views()


class DeviceTrainStream:
    """Training batches ``(*views, labels)`` made on the device from uint8 images."""

    def __init__(self, images: Tensor, labels: Tensor, specs: Sequence[ViewSpec],
                 mean: Sequence[float], std: Sequence[float], batch: int, *, seed: int,
                 rank: int = 0, world: int = 1, channels_last: bool = False,
                 compile: bool = False):
        self.images, self.labels, self.specs = images, labels, tuple(specs)
        self.batch, self.seed, self.rank, self.world = batch, seed, rank, world
        self.mean = torch.tensor(mean, device=images.device)
        self.std = torch.tensor(std, device=images.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # torch.compile fuses the ~100 elementwise colour kernels of a view into a few.
        self._colour = torch.compile(gpu_augment.colour, dynamic=False) if compile \
            else gpu_augment.colour
        self._order: Tensor | None = None
        self._params: list[ViewParams] = []

    def __len__(self) -> int:
        return len(self.images) // (self.batch * self.world)  # drop the last partial batch

    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's order and every sample's view parameters (CPU generator)."""
        g = torch.Generator().manual_seed(hash((self.seed, epoch)) % 2**63)
        n, _, h, w = self.images.shape
        device = self.images.device
        self._order = torch.randperm(n, generator=g).to(device)
        self._params = [gpu_augment.draw_params(s, n, h, w, g).to(device) for s in self.specs]

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, ...]]:
        """Batches ``start``, ``start + 1``, ... of the epoch set by `set_epoch`."""
        if self._order is None:
            raise RuntimeError("call set_epoch before iterating")
        for step in range(start, len(self)):
            lo = (step * self.world + self.rank) * self.batch
            index = self._order[lo:lo + self.batch]  # (B,) on the device: no host sync
            x = self.images[index]  # (B, C, H, W) uint8
            views = []
            for spec, params in zip(self.specs, self._params):
                p = params.take(index)
                v = gpu_augment.resized_crop(x, p.box, spec.size)
                views.append(self._colour(v, p, spec, self.mean, self.std)
                             .contiguous(memory_format=self.memory_format))
            yield (*views, self.labels[index])

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return self.iter_from(0)


class DeviceEvalStream:
    """Un-augmented ``(x, labels)`` batches: resize + centre crop + normalise, on the device."""

    def __init__(self, images: Tensor, labels: Tensor, size: int, mean: Sequence[float],
                 std: Sequence[float], batch: int = 1024, channels_last: bool = False):
        self.images, self.labels, self.size, self.batch = images, labels, size, batch
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for lo in range(0, len(self.images), self.batch):
            x = self.images[lo:lo + self.batch]
            if x.shape[-2:] != (self.size, self.size):  # as the loader's Resize + CenterCrop
                x = TF.center_crop(TF.resize(x, [self.size], antialias=True), [self.size])
            x = (x.float() / 255.0 - self.mean) / self.std
            yield x.contiguous(memory_format=self.memory_format), self.labels[lo:lo + self.batch]


TrainStream = DeviceTrainStream | ClassifyStream


def _source(ds: Dataset) -> tuple[Any, list[int] | None]:
    """The ``(image, label)`` source under an eval set, and the subset's indices if any."""
    if isinstance(ds, Subset):
        return ds.dataset.source, list(ds.indices)  # type: ignore[attr-defined]
    return ds.source, None  # type: ignore[attr-defined]


def device_streams(bundle: DataBundle, cfg: Config, per_device: dict[int, int],
                   device: torch.device, rank: int, world: int
                   ) -> tuple[dict[int, TrainStream], DeviceEvalStream, DeviceEvalStream,
                              DeviceEvalStream | None]:
    """Decode the bundle's images once, move them to ``device``, and build the streams: the
    training streams by batch, the bank (training images), the test queries and, for a
    classification run with ``labels.val_fraction``, the validation split (decoded once too:
    evaluated every time, it must not go back through PIL and loader workers)."""
    workers = cfg.data.num_workers
    mean, std, flags = bundle.mean, bundle.std, cfg.train
    train: dict[int, TrainStream]
    if bundle.method is not None and bundle.method.device_classify:  # weak (+ strong), labels
        train, train_x, train_y = classify_streams(bundle, cfg, per_device, device, rank, world)
    else:
        train_source, _ = _source(bundle.train)  # type: ignore[arg-type]
        train_x, train_y = decode_uint8(train_source, workers)
        check_fits(train_x, device)
        train_x, train_y = train_x.to(device), train_y.to(device)
        train = {b: DeviceTrainStream(train_x, train_y, view_specs(bundle.method), mean, std, per,
                                      seed=cfg.run.seed, rank=rank, world=world,
                                      channels_last=flags.channels_last, compile=flags.compile)
                 for b, per in per_device.items()}
    test_source, test_index = _source(bundle.test_eval)
    test_x, test_y = decode_uint8(test_source, workers)

    def eval_stream(x: Tensor, y: Tensor, index: list[int] | None) -> DeviceEvalStream:
        if index is not None:
            pick = torch.as_tensor(index, device=x.device)
            x, y = x[pick], y[pick]
        return DeviceEvalStream(x.to(device), y.to(device), cfg.data.image_size, mean, std,
                                channels_last=flags.channels_last)

    _, bank_index = _source(bundle.train_eval)
    val = None
    if bundle.val_eval is not None:
        val_source, val_index = _source(bundle.val_eval)
        val = eval_stream(*decode_uint8(val_source, workers), val_index)
    return (train, eval_stream(train_x, train_y, bank_index),
            eval_stream(test_x, test_y, test_index), val)
