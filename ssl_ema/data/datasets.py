"""Data sets: the embedded scikit-learn digits, CIFAR-10/100 (torchvision layout) and ImageFolder.

Each builder returns a :class:`DataBundle` of three views of the data: augmented pairs for
training, and plain train/test images for kNN evaluation. Missing data is a :class:`DataError`
(one line, with the fix) raised before any model is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.data import views
from ssl_ema.data.file_index import IMAGE_EXTENSIONS, IndexedFolder, cached_index
from ssl_ema.data.labels import apply_labels
from ssl_ema.data.method_data import MethodData
from ssl_ema.data.seeded import SeededViews, Transformed

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ConfigError):
    """The data a recipe names is missing or unusable; the message says how to fix it."""


class TensorImages(Dataset):
    """In-memory images ``(N, C, H, W)`` float in [0, 1] with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class DataBundle:
    train: SeededViews  # (*views, label): what the method trains on
    train_eval: Dataset  # (x, label), un-augmented: the kNN memory bank
    test_eval: Dataset  # (x, label), un-augmented: held-out queries
    num_classes: int
    in_chans: int
    skipped_files: int = 0  # unreadable images left out (data.corrupt=skip)
    mean: tuple[float, ...] = ()  # the normalisation of every view (device pipeline)
    std: tuple[float, ...] = ()
    val_eval: Dataset | None = None  # (x, label), un-augmented: labels.val_fraction held out
    # labels.symmetric_noise: requested and realised rates (training / validation labels that
    # differ from the true ones); empty without synthetic noise
    label_noise: dict[str, float] = field(default_factory=dict)
    method: MethodData | None = None  # what the method trains on (set by build_data)


# What PIL raises for a file that is not a readable image (UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, SyntaxError, ValueError)


def _unreadable(paths: Sequence[str]) -> list[str]:
    """Files PIL cannot identify or whose header does not verify, and JPEGs cut off before
    their end-of-image marker that do not decode either (`_cut_jpeg`); no full decode of an
    intact file: about as fast as PIL's ``verify`` alone (docs/RESULTS.md)."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                with Image.open(f) as image:
                    jpeg = image.format == "JPEG"
                    image.verify()
                if jpeg and _cut_jpeg(f):
                    bad.append(path)
        except UNREADABLE:
            bad.append(path)
    return bad


def _cut_jpeg(f: BinaryIO) -> bool:
    """A JPEG cut off mid-data: PIL's ``verify`` reads only its headers and passes it, and the
    run then fails on it mid-training. An intact file ends with the EOI marker FF D9 (ITU-T
    T.81, B.2.1), read here from the open file; a file without one (cut, or with bytes after
    the marker, which decoders ignore) is decoded to decide."""
    from PIL import Image

    f.seek(-2, os.SEEK_END)
    if f.read(2) == b"\xff\xd9":
        return False
    f.seek(0)
    try:
        with Image.open(f) as image:
            image.load()
    except UNREADABLE:
        return True
    return False


def read_rgb(path: str) -> Any:
    """An image file as an RGB PIL image (the loader of ``imagefolder``'s ImageFolder, run in
    loader workers); a file that cannot be read is one line naming it and ``data.corrupt``,
    not PIL's OSError (which reads as a disk fault) under a worker's traceback."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UNREADABLE as e:
        raise DataError(f"'{path}' is not a readable image ({e}); remove or replace it, then "
                        "resume (data.corrupt=fail, the default, or skip checks every file at "
                        "start-up)") from None


def _drop_unreadable(folder: Any, policy: str) -> int:
    """Check every file of an ImageFolder; fail on the first bad one or drop them all."""
    if policy == "trust":
        return 0
    bad = set(_unreadable([path for path, _ in folder.samples]))
    if bad and policy == "fail":
        first = sorted(bad)[0]
        raise DataError(f"'{first}' is not a readable image ({len(bad)} such files); remove "
                        "them or set data.corrupt=skip to leave them out")
    folder.samples = [s for s in folder.samples if s[0] not in bad]
    folder.imgs, folder.targets = folder.samples, [y for _, y in folder.samples]
    return len(bad)


def _sample_unreadable(folder: IndexedFolder, policy: str, seed: int, n: int = 256) -> int:
    """The JPEG pipeline's start-up check: ``n`` files drawn with ``seed`` (not every file: the
    rest are checked when their batch decodes, under the same policy)."""
    if policy == "trust" or not folder.samples:
        return 0
    pick = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:n]
    bad = set(_unreadable([folder.samples[i][0] for i in pick.tolist()]))
    if bad and policy == "fail":
        raise DataError(f"'{sorted(bad)[0]}' is not a readable image ({len(bad)} in a sample of "
                        f"{len(pick)} files); remove such files or set data.corrupt=skip to "
                        "leave them out")
    folder.drop(bad)
    return len(bad)


def _indexed_folder(folder: Path, cfg: Config) -> IndexedFolder:
    """``folder`` through its cached file list (`file_index`): no file opened here."""
    cache = Path(cfg.data.index_cache).expanduser() if cfg.data.index_cache else None
    classes, samples, _, _ = cached_index(folder, cache)
    if not samples:
        raise DataError(f"no images found under '{folder}' (class folders of "
                        f"{', '.join(IMAGE_EXTENSIONS)} files)")
    return IndexedFolder(folder, classes, samples, cfg.data.corrupt == "skip")


def _subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """A fixed random subset of ``n`` items (all when n <= 0 or n >= len)."""
    size = len(ds)  # type: ignore[arg-type]
    if n <= 0 or n >= size:
        return ds
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.tolist())


def keep_first_per_class(source: Any, per_class: int) -> None:
    """Keep only the first ``per_class`` items of every class of a training source, in place
    (an ImageFolder or file index: ``samples``; torchvision's CIFAR: ``data``; in-memory:
    ``images``), so that every view of the bundle (training views, BatchNorm bank, labels)
    sees the same subset. DataError if a class has fewer items."""
    targets = np.asarray(getattr(source, "targets", getattr(source, "labels", [])))
    keep = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if len(members) < per_class:
            raise DataError(f"data.train_per_class={per_class}: class {c} has only "
                            f"{len(members)} training images; lower it")
        keep.append(members[:per_class])
    idx = np.sort(np.concatenate(keep))
    if hasattr(source, "samples"):  # ImageFolder, IndexedFolder
        source.samples = [source.samples[i] for i in idx]
        source.targets = [c for _, c in source.samples]
        if hasattr(source, "imgs"):
            source.imgs = source.samples
    elif hasattr(source, "data"):  # torchvision CIFAR: (N, H, W, C) uint8 in memory
        source.data, source.targets = source.data[idx], [int(targets[i]) for i in idx]
    elif isinstance(source, TensorImages):
        source.images, source.labels = source.images[idx], source.labels[idx]
    else:
        raise DataError(f"data.train_per_class: cannot take a subset of "
                        f"{type(source).__name__}; set it to 0")


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """scikit-learn's 1,797 8x8 digits, split stratified into train/test with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    return tuple(
        train_test_split(images, digits.target, test_size=test_fraction,
                         stratify=digits.target, random_state=seed)
    )


def build_digits(cfg: Config, method: MethodData) -> DataBundle:
    x_train, x_test, y_train, y_test = digits_split()
    mean, std = float(x_train.mean()), float(x_train.std())
    size = cfg.data.image_size

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).unsqueeze(1)  # (N, 1, 8, 8)

    train = TensorImages(images(x_train), torch.from_numpy(y_train))
    test = TensorImages(images(x_test), torch.from_numpy(y_test))
    return DataBundle(
        train=SeededViews(train, method.loader_views("digits", mean, std), cfg.run.seed),
        train_eval=Transformed(train, views.digits_eval(size, mean, std)),
        test_eval=Transformed(test, views.digits_eval(size, mean, std)),
        num_classes=10,
        in_chans=1,
    )


def rgb_bundle(train: Any, test: Any, cfg: Config, method: MethodData, mean: Sequence[float],
               std: Sequence[float], num_classes: int) -> DataBundle:
    """A bundle of RGB ``(PIL image, label)`` sources: the method's training views, and the
    plain evaluation transform."""
    if cfg.data.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    size, m, s = cfg.data.image_size, tuple(mean), tuple(std)
    return DataBundle(
        train=SeededViews(train, method.loader_views("rgb", m, s), cfg.run.seed),
        train_eval=Transformed(train, views.rgb_eval(size, m, s)),
        test_eval=Transformed(test, views.rgb_eval(size, m, s)),
        num_classes=num_classes,
        in_chans=3,
        mean=m,
        std=s,
    )


def build_cifar(cfg: Config, method: MethodData) -> DataBundle:
    from torchvision.datasets import CIFAR10, CIFAR100

    is10 = cfg.data.dataset == "cifar10"
    cls, name = (CIFAR10, "CIFAR-10") if is10 else (CIFAR100, "CIFAR-100")
    folder = "cifar-10-batches-py" if is10 else "cifar-100-python"
    root = cfg.data.root
    try:
        train = cls(root, train=True, download=cfg.data.download)
        test = cls(root, train=False, download=cfg.data.download)
    except Exception as e:  # offline download (URLError) or missing files (RuntimeError)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{name} not found under data.root='{root}' and could not be downloaded ({reason}); "
            f"set data.root to the folder that holds {folder}/, or run once with internet access"
        ) from e
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if is10 else (CIFAR100_MEAN, CIFAR100_STD)
    return rgb_bundle(train, test, cfg, method, mean, std, len(train.classes))


def build_imagefolder(cfg: Config, method: MethodData) -> DataBundle:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.data.root)
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"data.root='{root}' has no '{split}/' folder; imagefolder expects "
                f"root/train/<class>/*.jpg and root/test/<class>/*.jpg"
            )
        if cfg.data.pipeline == "jpeg":  # a cached file list and a sampled check
            splits[split] = _indexed_folder(folder, cfg)
            continue
        try:
            splits[split] = ImageFolder(str(folder), loader=read_rgb)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"no images found under '{folder}': {str(e).splitlines()[0]}") from e
    if cfg.data.pipeline == "jpeg":
        skipped = sum(_sample_unreadable(splits[s], cfg.data.corrupt, cfg.run.seed + i)
                      for i, s in enumerate(("train", "test")))
    else:
        skipped = sum(_drop_unreadable(splits[s], cfg.data.corrupt) for s in ("train", "test"))
    if splits["train"].classes != splits["test"].classes:
        raise DataError(f"class folders of '{root}/train' and '{root}/test' differ; "
                        "they must match")
    if len(splits["train"].classes) < 2:  # kNN or top-1 over one class is always 1.0
        raise DataError(f"'{root}/train' has {len(splits['train'].classes)} class folder; the "
                        "labelled evaluation (kNN, top-1) needs at least 2, one folder per class")
    if root.name.lower().startswith("cifar10"):
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    bundle = rgb_bundle(splits["train"], splits["test"], cfg, method, mean, std,
                         len(splits["train"].classes))
    bundle.skipped_files = skipped
    return bundle


BUILDERS: dict[str, Callable[[Config, MethodData], DataBundle]] = {
    "digits": build_digits,
    "cifar10": build_cifar,
    "cifar100": build_cifar,
    "imagefolder": build_imagefolder,
}


def build_data(cfg: Config, method: MethodData, given: DataBundle | None = None) -> DataBundle:
    """Build the data a recipe names with ``method``'s training views (the engine looks them up:
    `ssl_ema.methods.registry.method_data`), or take the bundle of data sets ``given`` from
    Python (`ssl_ema.data.custom`); then the labels and evaluation subsets. Raises DataError
    with the fix when data is missing."""
    if given is None and cfg.data.dataset == "given":
        raise DataError("data.dataset=given: the data sets are passed from Python "
                        "(ssl_ema.train(train_set=..., test_set=...)); name a data set here")
    bundle = BUILDERS[cfg.data.dataset](cfg, method) if given is None else given
    bundle.method = method
    if cfg.data.train_per_class:
        keep_first_per_class(bundle.train.source, cfg.data.train_per_class)
    if method.labels != "none":  # splits, noisy labels, labelled subset
        bundle = apply_labels(bundle, cfg, method.unlabelled)
    n, seed = cfg.data.eval_subset, cfg.run.seed
    bundle.train_eval = _subset(bundle.train_eval, n, seed)
    bundle.test_eval = _subset(bundle.test_eval, n, seed + 1)
    if bundle.val_eval is not None:
        bundle.val_eval = _subset(bundle.val_eval, n, seed + 2)
    return bundle


def check_knn_bank(cfg: Config, data: DataBundle) -> None:
    """Refuse more neighbours than the kNN bank holds, for a method evaluated by kNN: each
    query would then vote over the whole bank, a score of class frequencies and similarities
    rather than of neighbours."""
    k, bank = cfg.eval.knn_k, len(data.train_eval)  # type: ignore[arg-type]
    if data.method is not None and data.method.evaluation == "knn" and k > bank:
        subset = f" (data.eval_subset={cfg.data.eval_subset})" if cfg.data.eval_subset else ""
        raise DataError(f"eval.knn_k={k} is more than the {bank} training images of the kNN "
                        f"bank{subset}; set eval.knn_k to at most {bank} (20 suits about 150 "
                        "images a class, 200 about 5,000)")
