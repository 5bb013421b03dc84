"""Data sets given from Python: any ``torch.utils.data.Dataset`` of ``(image, label)`` items,
the image a PIL image, a ``(C, H, W)`` tensor (float in [0, 1] or uint8) or an ``(H, W, C)``
uint8 array, trained on with the recipe's views as the named data sets are.

Images are converted to RGB PIL images, the input of lightly's and torchvision's transforms, so
every method's views apply unchanged; normalisation is ImageNet's unless the caller gives the
data set's own mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

from ssl_ema.config_schema import Config
from ssl_ema.data.datasets import IMAGENET_MEAN, IMAGENET_STD, DataBundle, DataError, rgb_bundle
from ssl_ema.data.method_data import MethodData


def to_rgb(image: Any) -> Any:
    """A PIL image, tensor or array as an RGB PIL image."""
    if not hasattr(image, "convert"):  # not PIL: tensor (C, H, W) or array (H, W, C)
        image = to_pil_image(image)
    return image if image.mode == "RGB" else image.convert("RGB")


class RGBImages(Dataset):
    """A caller's ``(image, label)`` data set with its images as RGB PIL images. ``targets``
    (the classification methods' labels, `ssl_ema.data.labels`) are the source's ``targets``
    or ``labels`` where it has them, else read once from its items."""

    def __init__(self, source: Dataset):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.source[i]
        return to_rgb(image), int(label)

    @cached_property
    def targets(self) -> np.ndarray:
        try:
            for attr in ("targets", "labels"):
                if hasattr(self.source, attr):
                    return np.asarray(getattr(self.source, attr), dtype=np.int64)
            return np.asarray([int(self.source[i][1]) for i in range(len(self))],
                              dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{type(self.source).__name__}: labels must be integer class "
                            f"indices ({e})") from None


def class_count(train: RGBImages, num_classes: int | None) -> int:
    """``num_classes`` if given, else ``len(train_set.classes)`` or the largest label + 1."""
    if num_classes is not None:
        return num_classes
    classes = getattr(train.source, "classes", None)
    if classes is not None:
        return len(classes)
    return int(train.targets.max()) + 1


def given_data(cfg: Config, method: MethodData, train_set: Dataset, test_set: Dataset,
               num_classes: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> DataBundle:
    """The bundle `ssl_ema.data.datasets.build_data` finishes (labels, evaluation subsets):
    training views of ``train_set``; its plain images as the kNN bank; ``test_set`` as the
    held-out queries."""
    for name, ds in (("train_set", train_set), ("test_set", test_set)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise DataError(f"{name}: expected a non-empty map-style Dataset of (image, label) "
                            f"items, got {type(ds).__name__}")
    train, test = RGBImages(train_set), RGBImages(test_set)
    try:
        train[0], test[0]
    except (TypeError, ValueError) as e:
        raise DataError(f"the data sets' items must be (image, label) with a PIL image, a "
                        f"(C, H, W) tensor or an (H, W, C) uint8 array: {e}") from e
    classes = class_count(train, num_classes)
    if classes < 2:  # kNN or top-1 over one class is always 1.0
        raise DataError(f"num_classes={classes}: the labelled evaluation needs at least 2")
    for name, ds in (("train_set", train), ("test_set", test)):
        check_labels(name, ds.targets, classes)
    return rgb_bundle(train, test, cfg, method, mean, std, classes)


def check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    """Every label is a class index, ``0 .. num_classes - 1``, checked before any work: the kNN
    vote and the classifiers index with them (a -1 failed deep in the first evaluation)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{name}[{i}] has label {labels[i]}, outside the class indices 0 to "
                        f"{num_classes - 1} (num_classes={num_classes}; {bad.size} such items); "
                        "fix or drop them, or pass num_classes=")
