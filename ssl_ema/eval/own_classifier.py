"""The ``classifier`` protocol of ``tools/eval.py``: a classification run judged by its own heads.

A supervised or pseudo-labelling run trains a classifier with its backbone, and its teacher and
EMA copies average both (Morales-Brotons et al. 2024). Their claims (EMA models are more
accurate, better calibrated and churn less across seeds) are about these networks, not about a
probe fitted afterwards; so each role (``student``, ``teacher``, ``ema_<momentum>``) is scored
with its own logits: top-1, ECE with 15 and 100 equal-mass bins, NLL and Brier, the same after
temperature scaling fitted on the run's validation split when it has one (Guo et al. 2017), and
its test probabilities for the reliability diagram and churn / JS divergence.

With ``recompute_bn`` > 0 every role is also scored as ``<role>+bn``: BatchNorm statistics
recomputed on the first batches of the un-augmented training images, the loader the trainer
uses, so the numbers equal the trainer's ``acc_<role>_test_bn`` (the paper's Sec. 5: an EMA of
weights needs its own statistics).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_ema.config import CLASSIFICATION_METHODS
from ssl_ema.data.datasets import DataBundle
from ssl_ema.ema import recompute_batchnorm
from ssl_ema.eval.calibration import calibration_metrics, calibration_report
from ssl_ema.eval.features import extract_features
from ssl_ema.eval.protocols import ProbeResult
from ssl_ema.eval.trained import no_classifier
from ssl_ema.run_files import saved_config

BN_SUFFIX = "+bn"
BN_BATCH = 256  # the trainer's batch for BatchNorm recomputation (its kNN bank loader)


def require_classifier(run_dir: Path) -> None:
    """A one-line ConfigError unless the run at ``run_dir`` trained a classifier."""
    raw = saved_config(run_dir)
    method = (raw.get("method") or {}).get("name", "byol")
    if method not in CLASSIFICATION_METHODS:
        raise no_classifier(run_dir, method)


def _logits(net: nn.Module, ds: Dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(ds, batch_size=BN_BATCH, num_workers=workers)
    logits, labels = extract_features(net, loader, normalize=False)  # (N, C), (N,)
    return logits.cpu(), labels.cpu()


def score(net: nn.Module, data: DataBundle, workers: int = 0) -> ProbeResult:
    """Metrics of ``net``'s own logits on test (temperature from validation, if any)."""
    test, test_labels = _logits(net, data.test_eval, workers)
    if data.val_eval is None:
        metrics = calibration_metrics(test, test_labels)
    else:
        val, val_labels = _logits(net, data.val_eval, workers)
        metrics = calibration_report(test, test_labels, val, val_labels)
        metrics["val_accuracy"] = (val.argmax(1) == val_labels).double().mean().item()
    return ProbeResult(metrics, test.double().softmax(1), test_labels)


def classifier_protocol(classifiers: dict[str, nn.Module], data: DataBundle,
                        device: torch.device, recompute_bn: int = 0, workers: int = 0
                        ) -> dict[str, ProbeResult]:
    """``role -> result`` for each network, and ``role+bn`` with recomputed statistics.

    Recomputation changes the loaded networks' buffers in place: own statistics are scored
    first, and the networks are not used afterwards.
    """
    out: dict[str, ProbeResult] = {}
    for role, net in classifiers.items():
        net.to(device)
        out[role] = score(net, data, workers)
        if recompute_bn:
            bank = DataLoader(data.train_eval, batch_size=BN_BATCH, num_workers=workers)
            recompute_batchnorm(net, bank, recompute_bn, device)
            out[role + BN_SUFFIX] = score(net, data, workers)
    return out
