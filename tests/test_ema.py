from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_ema.ema import EMA


def pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # different init on purpose
    return teacher, student


def test_update_matches_hand_computed_lerp() -> None:
    teacher, student = pair()
    before = [p.detach().clone() for p in teacher.parameters()]
    ema = EMA(teacher, student)
    ema.update(0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, rtol=0, atol=1e-7)
    assert ema.num_updates == 1


def test_two_steps_compose() -> None:
    teacher, student = pair()
    t0 = teacher[0].weight.detach().clone()
    s = student[0].weight.detach()
    ema = EMA(teacher, student)
    ema.update(0.5)
    ema.update(0.8)
    expected = 0.8 * (0.5 * t0 + 0.5 * s) + 0.2 * s
    torch.testing.assert_close(teacher[0].weight, expected)


def test_buffer_policies() -> None:
    teacher, student = pair()
    student[1].running_mean.fill_(3.0)
    EMA(teacher, student, buffers="own").update(0.9)
    assert torch.all(teacher[1].running_mean == 0.0)  # untouched
    EMA(teacher, student, buffers="copy").update(0.9)
    assert torch.all(teacher[1].running_mean == 3.0)


def test_momentum_edges_and_errors() -> None:
    teacher, student = pair()
    t0 = teacher[0].bias.detach().clone()
    ema = EMA(teacher, student)
    ema.update(1.0)
    torch.testing.assert_close(teacher[0].bias, t0, rtol=0, atol=0)
    ema.update(0.0)
    torch.testing.assert_close(teacher[0].bias, student[0].bias, rtol=0, atol=0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        ema.update(1.1)
    with pytest.raises(ValueError, match="same parameters"):
        EMA(nn.Linear(4, 3), nn.Linear(3, 4))


def test_state_round_trip() -> None:
    teacher, student = pair()
    ema = EMA(teacher, student)
    for _ in range(3):
        ema.update(0.9)
    other = EMA(*pair())
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3
