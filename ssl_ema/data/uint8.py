"""A data set decoded once into one uint8 tensor for the device pipeline (`device`,
`device_classify`), and the check that it fits in the accelerator's memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from ssl_ema.data.datasets import DataError, Transformed


def _pil_to_uint8(image: Any) -> Tensor:
    return TF.pil_to_tensor(image.convert("RGB"))  # (3, H, W) uint8


def decode_uint8(source: Any, num_workers: int) -> tuple[Tensor, Tensor]:
    """Every image of an ``(image, label)`` source as one uint8 tensor (N, C, H, W) + labels."""
    data = getattr(source, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4:
        # torchvision's CIFAR keeps (N, H, W, C) uint8 in memory: no decoding at all.
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(
            source.targets, dtype=torch.int64)
    loader = DataLoader(Transformed(source, _pil_to_uint8), batch_size=500,
                        num_workers=num_workers)
    try:
        batches = list(loader)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise DataError(
            "data.pipeline=device keeps the data set as one tensor, but its images differ in "
            "size; resize them to one size or use data.pipeline=loader") from e
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def check_fits(images: Tensor, device: torch.device) -> None:
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() > free // 2:
        raise DataError(
            f"the data set needs {images.numel() / 2**30:.1f} GiB as uint8 but only "
            f"{free / 2**30:.1f} GiB of device memory is free; use data.pipeline=loader")
