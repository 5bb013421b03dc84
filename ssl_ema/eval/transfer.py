"""Transfer evaluation: one frozen backbone on several downstream data sets.

Each data set is read raw (PIL images or tensors) and brought to the backbone's input: its
channel count (RGB -> grey by ITU-R 601 luma, grey -> RGB by repetition), its image size
(resize + centre crop), and per-channel standardisation with statistics of the downstream
training images (so no data set needs hand-entered constants). Then kNN and/or the linear probe
(``protocols.py``) on the frozen features, as in the transfer studies of Kornblith et al. (2019)
and Morales-Brotons et al. (2024, Sec. 5: linear probes of EMA and SGD models). Several models
are scored on one `Prepared` data set, beside the fair floor (`floor_on`: the same architecture,
random, BatchNorm statistics recomputed on the downstream training images; ``floor.py``).

Data sets are named ``name`` or ``name=root``: ``digits`` (embedded), ``fashion_mnist`` (IDX
files), ``cifar10`` / ``cifar100`` (torchvision layout, or an ImageFolder layout such as the
JPEG copy of CIFAR-10), ``imagefolder=<root>`` (``root/{train,test}/<class>/*``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ssl_ema.config import ConfigError
from ssl_ema.data.datasets import DataError, TensorImages, Transformed, _subset
from ssl_ema.eval.context import EVAL_BATCH
from ssl_ema.eval.floor import fair_floor
from ssl_ema.eval.protocols import embed, run_protocol


@dataclass
class Downstream:
    name: str
    train: Dataset  # (raw image, label)
    test: Dataset
    num_classes: int


def _digits(root: Path | None) -> Downstream:
    from ssl_ema.data.datasets import digits_split

    x_train, x_test, y_train, y_test = digits_split()

    def images(x: Any, y: Any) -> TensorImages:
        return TensorImages(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))

    return Downstream("digits", images(x_train, y_train), images(x_test, y_test), 10)


def _fashion_mnist(root: Path | None) -> Downstream:
    from ssl_ema.data.idx import FASHION_MNIST_DEFAULT_ROOT, load_fashion_mnist

    root = root or Path(FASHION_MNIST_DEFAULT_ROOT)
    splits = []
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(root, split)
        splits.append(TensorImages(torch.from_numpy(images).unsqueeze(1),  # (N, 1, 28, 28) uint8
                                   torch.from_numpy(labels)))
    return Downstream("fashion_mnist", splits[0], splits[1], num_classes=10)


def _imagefolder(root: Path | None, name: str = "imagefolder") -> Downstream:
    from torchvision.datasets import ImageFolder

    if root is None:
        raise DataError(f"{name} needs a folder: write {name}=<root> with root/train/<class>/*")
    folders = {s: root / s for s in ("train", "test")}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"'{root}' has no '{split}/' folder; {name} expects "
                            "root/train/<class>/* and root/test/<class>/*")
    train, test = ImageFolder(str(folders["train"])), ImageFolder(str(folders["test"]))
    if train.classes != test.classes:
        raise DataError(f"class folders of '{root}/train' and '{root}/test' differ")
    return Downstream(name, train, test, len(train.classes))


def _cifar(name: str) -> Callable[[Path | None], Downstream]:
    def load(root: Path | None) -> Downstream:
        root = root or Path("data")
        if (root / "train").is_dir():  # ImageFolder layout (e.g. the JPEG copy of CIFAR-10)
            return _imagefolder(root, name)
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if name == "cifar10" else CIFAR100
        try:
            train, test = cls(str(root), train=True), cls(str(root), train=False)
        except RuntimeError as e:
            raise DataError(f"{name} not found under '{root}' ({str(e).splitlines()[0]}); "
                            f"write {name}=<folder holding the torchvision files or "
                            "train/ and test/ class folders>") from e
        return Downstream(name, train, test, len(train.classes))

    return load


SOURCES: dict[str, Callable[[Path | None], Downstream]] = {
    "digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"), "imagefolder": _imagefolder,
}


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``name`` or ``name=root`` -> (name, root); unknown names are an error naming the valid."""
    name, _, root = spec.partition("=")
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset '{name}'; valid: {', '.join(SOURCES)} "
                          "(as name or name=root)")
    return name, Path(root) if root else None


def load_downstream(spec: str) -> Downstream:
    name, root = parse_spec(spec)
    if root is not None and not root.exists():
        raise DataError(f"data folder '{root}' for {name} does not exist; fix the path")
    return SOURCES[name](root)


class MatchChannels:
    """(C, H, W) -> (in_chans, H, W): RGB to luma for grey models, grey repeated for RGB ones."""

    def __init__(self, in_chans: int):
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.in_chans:
            return x
        if self.in_chans == 1 and x.shape[0] == 3:
            return v2.functional.rgb_to_grayscale(x)
        if x.shape[0] == 1:
            return x.expand(self.in_chans, *x.shape[1:])
        raise DataError(f"cannot feed {x.shape[0]}-channel images to a {self.in_chans}-channel "
                        "backbone")


def pixel_statistics(ds: Dataset, to_tensor: v2.Compose, items: int = 2048
                     ) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the native-resolution pixels of a fixed subset
    of ``ds``, as published normalisation constants are computed (and digits' own, in
    ``data/datasets.py``): before resizing, which would smooth the std down. Images of
    different sizes are fine: per-image sums are accumulated."""
    sample = _subset(Transformed(ds, to_tensor), items, seed=0)
    count = total = squares = torch.zeros((), dtype=torch.float64)
    for i in range(len(sample)):  # type: ignore[arg-type]
        x = sample[i][0].double().flatten(1)  # (C, H*W)
        count, total, squares = count + x.shape[1], total + x.sum(1), squares + x.pow(2).sum(1)
    mean = total / count  # (C,)
    std = (squares / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def backbone_input(ds: Dataset, in_chans: int, image_size: int) -> tuple[v2.Compose, Transformed]:
    """The transform to the backbone's input, standardised per channel with ``ds``'s pixel
    statistics, and ``ds`` through it."""
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            MatchChannels(in_chans)])
    mean, std = pixel_statistics(ds, to_tensor)
    full = v2.Compose([to_tensor, v2.Resize(image_size, antialias=True),
                       v2.CenterCrop(image_size), v2.Normalize(mean, std)])
    return full, Transformed(ds, full)


@dataclass
class Prepared:
    """A downstream data set brought to one backbone input: the splits every model is scored on."""

    name: str
    train: Dataset  # (backbone input, label), standardised with the training images' statistics
    test: Dataset
    num_classes: int


def prepare(data: Downstream, *, in_chans: int, image_size: int, subset: int = 0) -> Prepared:
    """``data`` at the backbone's channels and size (``subset``: cap both splits)."""
    train_raw, test_raw = _subset(data.train, subset, 0), _subset(data.test, subset, 1)
    transform, train = backbone_input(train_raw, in_chans, image_size)
    return Prepared(data.name, train, Transformed(test_raw, transform), data.num_classes)


def score(backbone: nn.Module, data: Prepared, protocols: list[str], *, k: int = 200,
          temperature: float = 0.1, batch_size: int = EVAL_BATCH) -> dict[str, Any]:
    """``{protocol: metrics}`` of ``backbone``'s frozen features on ``data``."""
    start = time.perf_counter()
    feats = embed(backbone, data.train, data.test, data.num_classes, None, batch_size)
    out: dict[str, Any] = {"embed_seconds": round(time.perf_counter() - start, 1)}
    for protocol in protocols:
        start = time.perf_counter()
        out[protocol] = run_protocol(protocol, feats, k, temperature).metrics
        out[protocol]["seconds"] = round(time.perf_counter() - start, 1)
    return out


def floor_on(random_backbone: nn.Module, data: Prepared, batch_size: int = EVAL_BATCH) -> nn.Module:
    """The fair floor on a downstream data set: ``random_backbone`` (the architecture under test,
    untrained) with BatchNorm statistics recomputed on all of ``data``'s training images."""
    device = next(random_backbone.parameters()).device
    return fair_floor(random_backbone, DataLoader(data.train, batch_size=batch_size), None,
                      device)

