"""EMA teachers: hand-computed lerps, rho**kappa and period equivalences, warm-up, buffers, BN."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ssl_ema.ema import EMA, recompute_batchnorm
from ssl_ema.momentum import update_momentum, warmup_momentum


def net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_update_matches_hand_computed_lerp() -> None:
    student, teacher = net(0), net(1)  # different init on purpose
    t0 = params(teacher)
    ema = EMA(student, [teacher])
    ema.update(0.9)
    for before, t, s in zip(t0, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s, rtol=0, atol=1e-7)
    ema.update(0.8)
    w0, s0 = t0[0], student[0].weight.detach()
    torch.testing.assert_close(teacher[0].weight, 0.8 * (0.9 * w0 + 0.1 * s0) + 0.2 * s0)
    assert ema.num_updates == 2


def test_parallel_momenta_equal_separate_emas() -> None:
    momenta = [0.968, 0.984, 0.992, 0.996, 0.998]  # Morales-Brotons et al. 2024
    student = net(0)
    together = [net(1) for _ in momenta]
    apart = [net(1) for _ in momenta]
    ema = EMA(student, together)
    singles = [EMA(student, [t]) for t in apart]
    for step in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * (step + 1))
        ema.update(momenta)
        for single, m in zip(singles, momenta):
            single.update(m)
    for a, b in zip(together, apart):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # Slower momenta stay further from the moving student.
    gaps = [(t[0].weight - student[0].weight).abs().mean().item() for t in together]
    assert gaps == sorted(gaps)
    with pytest.raises(ValueError, match="2 momenta for 5 teachers"):
        ema.update([0.9, 0.9])


@pytest.mark.parametrize(("kappa", "period"), [(4, 1), (1, 16), (2, 8)])
def test_one_scaled_update_equals_many_on_a_frozen_student(kappa: int, period: int) -> None:
    """rho ** (kappa * T) once == rho kappa*T times when the student does not move."""
    student, a, b = net(0), net(1), net(1)
    rho = 0.99
    many = EMA(student, [a])
    for _ in range(kappa * period):
        many.update(rho)
    EMA(student, [b]).update(update_momentum(rho, kappa=kappa, period=period))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_warmup_values() -> None:
    # min(rho, (t + 1) / (t + 10)): 0.1 at t=0, 0.55 at t=10, rho once (t+1)/(t+10) exceeds it.
    assert warmup_momentum(0.999, 0) == pytest.approx(0.1)
    assert warmup_momentum(0.999, 10) == pytest.approx(0.55)
    assert warmup_momentum(0.99, 890) == pytest.approx(891 / 900)
    assert warmup_momentum(0.99, 892) == 0.99
    # Warm-up first, then the power: t=0 at kappa 2 -> 0.1 ** 2.
    assert update_momentum(0.99, kappa=2, warmup_t=0) == pytest.approx(0.01)
    assert update_momentum(0.99, kappa=2) == pytest.approx(0.9801)
    with pytest.raises(ValueError, match="momentum must lie in"):
        update_momentum(1.5)


def test_buffer_policies() -> None:
    student = net(0)
    student[1].running_mean.fill_(3.0)
    student[1].num_batches_tracked.fill_(7)
    own, copy, average = net(1), net(1), net(1)
    EMA(student, [own], buffers="own").update(0.9)
    assert torch.all(own[1].running_mean == 0.0) and own[1].num_batches_tracked == 0
    EMA(student, [copy], buffers="copy").update(0.9)
    assert torch.all(copy[1].running_mean == 3.0) and copy[1].num_batches_tracked == 7
    EMA(student, [average], buffers="average").update(0.9)
    torch.testing.assert_close(average[1].running_mean, torch.full((3,), 0.3))
    torch.testing.assert_close(average[1].running_var, torch.ones(3))  # both 1: unchanged
    assert average[1].num_batches_tracked == 7
    with pytest.raises(ValueError, match="valid: own, copy, average"):
        EMA(student, [own], buffers="mean")  # type: ignore[arg-type]


def test_structure_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same parameters"):
        EMA(nn.Linear(3, 4), [nn.Linear(4, 3)])


def test_fp32_teacher_of_a_bf16_student_keeps_small_updates() -> None:
    # 1 -> 1.0078125 is one bf16 ulp; (1 - 0.999) * ulp = 7.8e-6 is lost in a bf16 teacher.
    student = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    teacher, bf16_teacher = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0078125)
        teacher.weight.fill_(1.0)
        bf16_teacher.to(torch.bfloat16).weight.fill_(1.0)
    ema, low = EMA(student, [teacher]), EMA(student, [bf16_teacher])
    for _ in range(100):
        ema.update(0.999)
        low.update(0.999)
    expected = 1.0078125 - 0.0078125 * 0.999**100
    assert teacher.weight.dtype == torch.float32
    assert teacher.weight.item() == pytest.approx(expected, abs=1e-6)  # fp32 rounding
    assert bf16_teacher.weight.item() == 1.0  # what the fp32 teacher avoids


def test_state_round_trip() -> None:
    ema = EMA(net(0), [net(1)])
    for _ in range(3):
        ema.update(0.9)
    other = EMA(net(0), [net(1)])
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3


def test_recompute_batchnorm_matches_data_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + torch.tensor([1.0, -1, 0, 5])
    model = nn.Sequential(nn.BatchNorm1d(4))
    batches = [(x[i:i + 64], torch.zeros(64)) for i in range(0, 512, 64)]
    recompute_batchnorm(model, iter(batches), num_batches=8)
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=0, atol=1e-5)
    # update_bn averages per-batch unbiased variances: close to the full-data variance.
    torch.testing.assert_close(bn.running_var, x.var(0), rtol=0.05, atol=0)
    assert bn.momentum == 0.1  # restored

    # Two "ranks" on halves, combined by a mean all-reduce: the full data's statistics.
    halves = [nn.Sequential(nn.BatchNorm1d(4)) for _ in range(2)]
    for h, part in zip(halves, (batches[:4], batches[4:])):
        recompute_batchnorm(h, iter(part), num_batches=4)
    (m0, v0), (m1, v1) = [(h[0].running_mean.clone(), h[0].running_var.clone()) for h in halves]
    assert not torch.allclose(m0, m1, atol=1e-3)  # the shards really differ

    def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:  # rank 0's view of the reduction
        return (m0 + m1) / 2 if torch.equal(t, m0) else ((v0 + m0**2) + (v1 + m1**2)) / 2

    recompute_batchnorm(halves[0], iter(batches[:4]), 4, all_reduce_mean=all_reduce_mean)
    torch.testing.assert_close(halves[0][0].running_mean, x.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(halves[0][0].running_var, x.var(0), rtol=0.05, atol=0)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_fused_update_equals_per_teacher_updates(tmp_path: Path) -> None:
    momenta = [0.9, 0.99, 0.5]
    student = net(0)
    fused_teachers, plain_teachers = [net(1) for _ in momenta], [net(1) for _ in momenta]
    fused = EMA(student, fused_teachers, buffers="average", fused=True)
    plain = EMA(student, plain_teachers, buffers="average")
    # The teachers' parameters now live in flat buffers; loading a state dict writes into them.
    fused_teachers[2].load_state_dict(net(2).state_dict())
    plain_teachers[2].load_state_dict(net(2).state_dict())
    for step in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * (step + 1))
        fused.update(momenta)
        plain.update(momenta)
    for a, b in zip(fused_teachers, plain_teachers):  # lerp_'s rounding: bit for bit
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), name
    x = torch.randn(8, 4)
    torch.testing.assert_close(fused_teachers[0].eval()(x), plain_teachers[0].eval()(x))
    # Its state dict holds copies (views of the flat buffer share one storage, which
    # safetensors refuses); loading one writes back into the flat buffer.
    path = tmp_path / "teacher.safetensors"
    save_model(fused_teachers[1], str(path))
    fused_teachers[1].load_state_dict(net(3).state_dict())
    assert not torch.equal(fused_teachers[1][0].weight, plain_teachers[1][0].weight)
    load_model(fused_teachers[1], str(path))
    assert torch.equal(fused_teachers[1][0].weight, plain_teachers[1][0].weight)
    fused.update(momenta)
    plain.update(momenta)
    assert torch.equal(fused_teachers[1][0].weight, plain_teachers[1][0].weight)
