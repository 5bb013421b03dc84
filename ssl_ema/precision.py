"""fp32 that rounds as fp32: TF32 off where a few float ops decide discrete outcomes.

The trainer lets CUDA's fp32 matmuls use TF32 (``engine/accelerator.py``: inputs rounded to 10
mantissa bits, 4.9e-4 relative), and cuDNN uses it for fp32 convolutions by default. That is
the right trade for training steps, not for code whose float results are then rounded to a
decision: the views' nearest-neighbour sampling, ``floor`` of uint8-valued blends, the
3x3 sharpness smoothing rounded to a level (`gpu_randaugment`), and the kNN similarities whose
top-k picks the neighbours. Under TF32 those decisions move with the device, not the data
(``tools/view_precision.py`` measures by how much). Inside :func:`exact_fp32` both are off;
the ops it guards are a few percent of a step, so full fp32 costs next to nothing there.
Only the matmul-precision API that the trainer itself uses is touched (mixing it with the
``allow_tf32`` flags makes torch refuse to report the precision), and the previous settings
come back on exit, so a compiled training step sees no change of global state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Inside: fp32 matmuls and cuDNN convolutions without TF32 (CPU fp32 is already so)."""
    cudnn, matmul = torch.backends.cudnn, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                         deterministic=cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
