"""CIFAR-10N human noisy labels (Wei et al., "Learning with Noisy Labels Revisited", ICLR 2022).

``CIFAR-10_human.pt`` holds, for the 50,000 CIFAR-10 training images in their original order
(data_batch_1..5), the clean label and five human label sets. Noise rates: aggre 9.01%,
random1-3 about 17-18%, worse 40.21%. torchvision's CIFAR10 keeps the original order; the JPEG
ImageFolder copy stores original image i as ``train/<class>/NNNN.jpg`` with NNNN the rank of i
among the images of its class, which is how its files are matched to the labels here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ssl_ema.config_schema import ConfigError

LABEL_SETS = {"clean": "clean_label", "aggre": "aggre_label", "worse": "worse_label",
              "random1": "random_label1", "random2": "random_label2", "random3": "random_label3"}


def load_cifar10n(path: str | Path) -> dict[str, np.ndarray]:
    """The label arrays of ``CIFAR-10_human.pt`` by our names (clean, aggre, ...), each (50000,).

    The file is a torch archive of NumPy arrays: loaded with ``weights_only=True``, allowing
    only the three NumPy globals such an archive needs (no arbitrary unpickling).
    """
    from numpy._core.multiarray import _reconstruct

    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray,
               (np.dtype, "numpy.dtype"), type(np.dtype(np.int64))]
    try:
        with torch.serialization.safe_globals(allowed):
            raw = torch.load(path, weights_only=True)
    except Exception as e:
        raise ConfigError(f"labels.noisy_file: cannot read '{path}' as CIFAR-10N "
                          f"({type(e).__name__}); pass CIFAR-10_human.pt") from e
    missing = [k for k in LABEL_SETS.values() if k not in raw]
    if missing:
        raise ConfigError(f"labels.noisy_file: '{path}' lacks {', '.join(missing)}; pass "
                          "CIFAR-10_human.pt (CIFAR-10N), not the CIFAR-100N file")
    return {name: np.asarray(raw[key], dtype=np.int64) for name, key in LABEL_SETS.items()}


def imagefolder_original_index(samples: Sequence[tuple[str, int]],
                               clean: np.ndarray) -> np.ndarray:
    """Original CIFAR-10 index of each ``(path, class)`` of the JPEG copy's train folder.

    ``train/<class c>/NNNN.jpg`` is the NNNN-th image of class c in the original order, that is
    ``flatnonzero(clean == c)[NNNN]``. ImageFolder's alphabetical classes are CIFAR-10's order.
    """
    by_class = [np.flatnonzero(clean == c) for c in range(int(clean.max()) + 1)]
    out = np.empty(len(samples), dtype=np.int64)
    for i, (path, c) in enumerate(samples):
        rank = int(Path(path).stem)
        if rank >= len(by_class[c]):
            raise ConfigError(f"'{path}' has no CIFAR-10 image of rank {rank} in class {c}; "
                              "labels.noisy needs the CIFAR-10 JPEG copy's train folder")
        out[i] = by_class[c][rank]
    return out


def attach_noisy_labels(targets: np.ndarray, original_index: np.ndarray,
                        sets: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The ``name`` label of each training image, after checking the match on the clean labels."""
    clean = sets["clean"][original_index]
    wrong = int((clean != targets).sum())
    if wrong:
        raise ConfigError(f"labels.noisy: {wrong} of {len(targets)} images disagree with "
                          "CIFAR-10N's clean labels; the data is not CIFAR-10 in original order")
    return sets[name][original_index]
