"""Data sets (digits, CIFAR, ImageFolder) and the augmented views methods train on."""

from ssl_ema.data.datasets import DataBundle, DataError, build_data

__all__ = ["DataBundle", "DataError", "build_data"]
