"""Around a CPU bf16 fault: oneDNN's convolution weight gradient on maps smaller than the stride.

Under bf16 on the CPU, torch's oneDNN (mkldnn) backward-weights kernel of a strided, zero-padded
convolution whose input is smaller than the stride in a spatial side (a 3x3, stride 2, padding 1
conv on a 1x1 map) leaves the taps that see only padding uninitialised: their true gradient is
exactly 0, what comes back is whatever the freed memory held (NaN, inf or a finite value up to
1e34; ``tests/test_conv_guard.py``, docs/RESULTS.md "A CPU bf16 fault"). Reproduced in pure
torch 2.13.0 (oneDNN 3.12.0), 2.14.1 (3.12.0) and 2.15.0 (3.13.3) on an AVX-512 CPU; fp32,
stride 1 and inputs at least the stride are right; with oneDNN off the gradient is right but a
bf16 training step is 10-20x slower. The maps are that small where tiny images meet a deep
network: DINO's 8 px local crops at layer3 of ``test_resnet``, 16 px crops at layer4 of a
ResNet-18 without the CIFAR stem. A NaN there never shows in the loss (the forward skips those
taps too), so ``train.nonfinite`` cannot catch it: the student and every EMA carry it.

The guard: such a conv pads its input with zeros up to the stride (at the bottom/right, where the
padding already was zeros) and crops the output back to its size. The output and every gradient
are the same sums (the added zeros meet only taps that met padding before), oneDNN's kernel stays,
and nothing changes for any other shape, device or precision. Every method's student gets it
(`ssl_ema.methods.base`); only plain ``nn.Conv2d`` modules (timm's resnets, stems, ViT patch
embeddings): a subclass with its own ``forward`` (timm's StdConv2d) keeps its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bf16_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if torch.bfloat16 in (x.dtype, weight.dtype):
        return True
    return torch.is_autocast_enabled("cpu") and \
        torch.get_autocast_dtype("cpu") == torch.bfloat16


def needs_guard(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this forward would hit the fault: bf16 on the CPU, a weight gradient to come,
    zero padding, and an input side smaller than the stride."""
    # The CPU test first: on a GPU, the one check this costs each strided conv's forward.
    padding = conv.padding
    return (x.device.type == "cpu" and not isinstance(padding, str)
            and any(p > 0 for p in padding) and conv.padding_mode == "zeros"
            and any(n < s for n, s in zip(x.shape[-2:], conv.stride))
            and weight.requires_grad and torch.is_grad_enabled() and _bf16_on_cpu(x, weight))


def out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class GuardedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that pads a CPU bf16 input smaller than its stride (module docstring)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if not needs_guard(self, input, weight):
            return super()._conv_forward(input, weight, bias)
        h, w = input.shape[-2:]
        sh, sw = self.stride
        padded = F.pad(input, (0, max(0, sw - w), 0, max(0, sh - h)))
        out = super()._conv_forward(padded, weight, bias)
        (kh, kw), (ph, pw), (dh, dw) = self.kernel_size, self.padding, self.dilation
        return out[..., :out_size(h, kh, sh, ph, dh), :out_size(w, kw, sw, pw, dw)]


def guard_convs(module: nn.Module) -> int:
    """Turn every plain strided, zero-padded ``nn.Conv2d`` in ``module`` into a
    `GuardedConv2d` (the same module, parameters and state dict); returns how many."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and any(s > 1 for s in m.stride) and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str) and any(p > 0 for p in m.padding):
            m.__class__ = GuardedConv2d
            n += 1
    return n
