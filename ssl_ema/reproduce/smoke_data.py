"""The smoke check's data, made on the spot (a lease carries no data set for it): a CIFAR-like
ImageFolder of small JPEGs, and the JPEG kinds a GPU decoder may refuse.

Each class has its own coarse colour field, upscaled, plus per-image noise and a random shift:
enough structure that a few training steps change what kNN sees, and JPEG-compressible like
photographs rather than like noise.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def _image(rng: np.random.Generator, field: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    base = np.asarray(Image.fromarray(field).resize((size + 8, size + 8), Image.BICUBIC),
                      np.int16)
    dy, dx = rng.integers(0, 9, 2)
    crop = base[dy:dy + size, dx:dx + size]
    return np.clip(crop + rng.normal(0, 16, crop.shape), 0, 255).astype(np.uint8)


def image_folder(root: Path, classes: int, per_class: int, test_per_class: int, size: int,
                 seed: int = 0) -> Path:
    """``root/{train,test}/c<k>/<n>.jpg``: ``size`` px RGB JPEGs (quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    fields = rng.integers(0, 256, (classes, 4, 4, 3), dtype=np.uint8)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(rng, fields[c], size)).save(folder / f"{i:05d}.jpg",
                                                                   quality=90)
    return root


def special_jpegs(size: int, seed: int = 0) -> dict[str, bytes]:
    """The JPEG kinds nvJPEG may not decode, as bytes: greyscale, CMYK, progressive (and a
    baseline RGB one to compare)."""
    from PIL import Image

    rgb = Image.fromarray(_image(np.random.default_rng(seed),
                                 np.full((4, 4, 3), 128, np.uint8), size))
    kinds = {"baseline": (rgb, {}), "greyscale": (rgb.convert("L"), {}),
             "cmyk": (rgb.convert("CMYK"), {}), "progressive": (rgb, {"progressive": True})}
    out = {}
    for name, (image, options) in kinds.items():
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90, **options)
        out[name] = buf.getvalue()
    return out


def add_special_jpegs(folder: Path, size: int, copies: int = 2) -> list[Path]:
    """``copies`` of each special kind in ``folder`` (a class folder of the training set)."""
    paths = []
    for name, data in special_jpegs(size).items():
        for i in range(copies):
            path = folder / f"special_{name}_{i}.jpg"
            path.write_bytes(data)
            paths.append(path)
    return paths
