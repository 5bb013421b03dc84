"""IDX reader on tiny files written here, and the downstream input pipeline."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from ssl_ema.data.datasets import DataError
from ssl_ema.data.idx import load_fashion_mnist, read_idx
from ssl_ema.eval.transfer import MatchChannels, backbone_input, load_downstream, pixel_statistics


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_read_idx_round_trips_uint8_and_big_endian_int32(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images, 0x08, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "b", ints, 0x0C, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), ints)
    (tmp_path / "c").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "c")
    write_idx(tmp_path / "d", images, 0x08, compress=False)
    (tmp_path / "d").write_bytes((tmp_path / "d").read_bytes()[:-1])
    with pytest.raises(DataError, match="needs"):
        read_idx(tmp_path / "d")


def test_fashion_mnist_layout_through_transfer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), 0x08, compress=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
                  np.arange(n, dtype=np.uint8) % 3, 0x08, compress=True)
    images, labels = load_fashion_mnist(tmp_path, "test")
    assert images.shape == (4, 28, 28) and labels.tolist() == [0, 1, 2, 0]
    data = load_downstream(f"fashion_mnist={tmp_path}")
    assert (len(data.train), len(data.test), data.num_classes) == (6, 4, 10)
    # statistics of the native 28x28 pixels (grey, repeated to RGB), as NumPy computes them
    pixels = read_idx(tmp_path / "train-images-idx3-ubyte.gz") / 255.0
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            MatchChannels(3)])
    mean, std = pixel_statistics(data.train, to_tensor)
    assert mean == pytest.approx([pixels.mean()] * 3, rel=1e-6)
    assert std == pytest.approx([pixels.std()] * 3, rel=1e-6)
    # the backbone's input: RGB at 16 px, standardised with them
    _, train = backbone_input(data.train, in_chans=3, image_size=16)
    x = torch.stack([train[i][0] for i in range(6)])
    assert x.shape == (6, 3, 16, 16) and x.mean().abs() < 0.05


def test_match_channels() -> None:
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 2, 2)
    grey = MatchChannels(1)(rgb)
    assert grey.shape == (1, 2, 2) and torch.allclose(grey, torch.full((1, 2, 2), 0.2989),
                                                      atol=1e-4)  # ITU-R 601 luma of red
    assert torch.equal(MatchChannels(3)(grey), grey.expand(3, 2, 2))
