"""CPU bf16: the conv guard gives exact weight gradients where oneDNN's kernel returns
uninitialised memory (a map smaller than the stride; `ssl_ema.models.conv_guard`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_ema.models.conv_guard import GuardedConv2d, guard_convs
from tests.helpers import poison_freed_memory

# (input h, w, kernel, stride, padding): shapes oneDNN got wrong in torch 2.13.0-2.15.0, and two
# it gets right (input at the stride; stride 1).
SHAPES = [(1, 1, 3, 2, 1), (1, 2, 3, 3, 1), (2, 1, 5, 3, 2), (3, 1, 3, 2, 1), (1, 1, 2, 4, 1),
          (2, 2, 3, 2, 1), (1, 1, 3, 1, 1)]


def weight_grad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    poison_freed_memory()
    y.float().square().mean().backward()
    assert conv.weight.grad is not None
    return conv.weight.grad


def reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """fp64 on bf16-rounded inputs (no oneDNN kernel: it has no fp64): the sum the bf16 kernel
    should give."""
    w = conv.weight.detach().bfloat16().double().requires_grad_()
    F.conv2d(x.bfloat16().double(), w, conv.bias.detach().bfloat16().double(),
             stride=conv.stride, padding=conv.padding).square().mean().backward()
    assert w.grad is not None
    return w.grad


@pytest.mark.parametrize(("h", "w", "k", "stride", "pad"), SHAPES)
def test_the_guard_gives_the_exact_weight_gradient(h: int, w: int, k: int, stride: int,
                                                    pad: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 48, k, stride=stride, padding=pad)
    assert guard_convs(conv) == (stride > 1) and isinstance(conv, GuardedConv2d) == (stride > 1)
    x = torch.randn(8, 48, h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.shape[-2:] == F.conv2d(x, conv.weight, stride=stride, padding=pad).shape[-2:]
    want = reference(conv, x)
    for _ in range(5):  # freed memory differs between calls: every call exact
        got = weight_grad(conv, x).double()
        assert torch.isfinite(got).all()
        # bf16 products, fp32 sums: within bf16's rounding of the largest entry
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_the_guard_changes_nothing_else() -> None:
    """fp32, no gradient, or inputs at least the stride: the plain conv, bit for bit; the
    state dict keeps its keys."""
    torch.manual_seed(1)
    plain = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    guarded = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    guarded.load_state_dict(plain.state_dict())
    guard_convs(guarded)
    assert list(guarded.state_dict()) == list(plain.state_dict())
    for x in (torch.randn(4, 16, 1, 1), torch.randn(4, 16, 5, 3)):
        assert torch.equal(guarded(x), plain(x))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(guarded(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(4, 16, 4, 4)
        assert torch.equal(guarded(x), plain(x))
    assert guard_convs(nn.Conv2d(16, 16, 1, stride=2)) == 0  # no padding: no fault
    assert guard_convs(nn.Conv2d(16, 16, 3, padding=1)) == 0  # stride 1: no fault
