"""IDX files (LeCun et al.'s MNIST format, also Fashion-MNIST's), plain or gzip-compressed.

Layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
dimensions n, then n big-endian uint32 sizes and the data, big-endian, row-major.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ssl_ema.data.datasets import DataError

# IDX type code -> NumPy dtype (big-endian where it matters)
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}

FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian dataset-fashion-mnist


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` decompressed on the fly)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in DTYPES:
        raise DataError(f"'{path}' is not an IDX file (bad magic number)")
    dtype, ndim = DTYPES[raw[2]], raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"'{path}' holds {len(raw)} bytes; its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"'{root}' has no {stem}[.gz]; point it at the Fashion-MNIST IDX files "
                    "(Debian: apt-get install dataset-fashion-mnist -> "
                    f"{FASHION_MNIST_DEFAULT_ROOT})")


def load_fashion_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` of the ``train`` or ``test`` split."""
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    root = Path(root)
    images, labels = read_idx(_find(root, images_stem)), read_idx(_find(root, labels_stem))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(f"'{root}': {split} images {images.shape} and labels {labels.shape} "
                        "do not pair up")
    return images, labels.astype(np.int64)
