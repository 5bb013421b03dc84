"""Frozen-feature protocols, shared by ``tools/eval.py`` and ``tools/transfer.py``.

- ``knn``: weighted kNN (``knn.py``) on L2-normalised features, top-1 accuracy.
- ``linear``: logistic-regression probe (``linear.py``) on standardised features; top-1 accuracy
  plus the calibration of its probabilities (``calibration.py``), temperature fitted on the
  probe's validation split. Its test probabilities feed the consistency measures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_ema.config import ConfigError
from ssl_ema.eval.calibration import calibration_report
from ssl_ema.eval.context import EVAL_BATCH
from ssl_ema.eval.features import cached_features
from ssl_ema.eval.knn import knn_classify
from ssl_ema.eval.linear import train_linear_probe

PROTOCOLS = ("knn", "linear")


@dataclass
class FrozenFeatures:
    """Raw features of a labelled train/test pair, on one device."""

    train: torch.Tensor  # (N, D)
    train_labels: torch.Tensor  # (N,)
    test: torch.Tensor  # (M, D)
    test_labels: torch.Tensor  # (M,)
    num_classes: int


@dataclass
class ProbeResult:
    metrics: dict[str, Any]
    test_probs: torch.Tensor | None = None  # (M, C); linear probe only
    test_labels: torch.Tensor | None = None  # (M,); with test_probs


def check_protocol(name: str, extra: tuple[str, ...] = ()) -> None:
    """A one-line ConfigError unless ``name`` is a frozen-feature protocol or one of ``extra``
    (``tools/eval.py`` adds ``classifier``, which needs a classification run, not features)."""
    valid = (*PROTOCOLS, *extra)
    if name not in valid:
        raise ConfigError(f"unknown protocol '{name}'; valid: {', '.join(valid)}")


def cache_key(*parts: Any) -> str:
    """Short stable hash of what features depend on (data config, image size, subsets)."""
    plain = [asdict(p) if is_dataclass(p) and not isinstance(p, type) else p for p in parts]
    return hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:10]


def embed(backbone: nn.Module, train: Dataset, test: Dataset, num_classes: int,
          cache_prefix: Path | None, batch_size: int = EVAL_BATCH, num_workers: int = 0
          ) -> FrozenFeatures:
    """Features of both splits (cached as ``<prefix>-{train,test}.safetensors`` if a prefix)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, ds in (("train", train), ("test", test)):
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
        cache = None if cache_prefix is None else \
            cache_prefix.with_name(f"{cache_prefix.name}-{split}.safetensors")
        out[split] = cached_features(backbone, loader, cache)
    return FrozenFeatures(*out["train"], *out["test"], num_classes=num_classes)


def knn_protocol(f: FrozenFeatures, k: int = 200, temperature: float = 0.1) -> ProbeResult:
    pred = knn_classify(F.normalize(f.train, dim=1), f.train_labels,
                        F.normalize(f.test, dim=1), f.num_classes, k, temperature)
    accuracy = (pred == f.test_labels.to(pred.device)).float().mean().item()
    return ProbeResult({"accuracy": accuracy, "k": min(k, len(f.train)),
                        "temperature": temperature})


def linear_protocol(f: FrozenFeatures, val_fraction: float = 0.1) -> ProbeResult:
    probe, val_idx = train_linear_probe(f.train, f.train_labels, f.num_classes,
                                        val_fraction=val_fraction)
    val_logits = probe.logits(f.train[val_idx.to(f.train.device)])
    val_labels = f.train_labels[val_idx.to(f.train_labels.device)]
    test_logits = probe.logits(f.test)
    metrics: dict[str, Any] = calibration_report(test_logits, f.test_labels, val_logits,
                                                 val_labels)
    metrics["weight_decay"] = probe.weight_decay
    metrics["val_accuracy"] = {f"{wd:g}": a for wd, a in probe.val_accuracy.items()}
    metrics["val_nll"] = {f"{wd:g}": v for wd, v in probe.val_nll.items()}
    return ProbeResult(metrics, test_logits.softmax(1).cpu(), f.test_labels.cpu())


def run_protocol(name: str, f: FrozenFeatures, k: int = 200, temperature: float = 0.1
                 ) -> ProbeResult:
    runners: dict[str, Callable[[], ProbeResult]] = {
        "knn": lambda: knn_protocol(f, k, temperature), "linear": lambda: linear_protocol(f)}
    check_protocol(name)
    return runners[name]()
