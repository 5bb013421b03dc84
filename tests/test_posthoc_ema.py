"""Post-hoc EMA (EDM2, Karras et al. 2024): power EMAs in samples seen, snapshots, reconstruction.

Trajectories are real: SGD on a noisy linear regression, or, where a profile is measured, a
student whose coordinates are indicators of the samples each step saw (its EMA *is* the profile).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_ema.posthoc import (
    PostHocEMA,
    PowerEMA,
    SnapshotWriteError,
    disk_usage,
    list_snapshots,
    read_snapshot,
    reconstruct,
    solve_reconstruction,
)
from ssl_ema.posthoc.profiles import (
    MAX_SIGMA_REL,
    gamma_to_sigma_rel,
    inner_products,
    power_profile,
    sigma_rel_to_gamma,
)
from ssl_ema.posthoc.snapshots import discard_after, payload_bytes, snapshot_due

TRACKED = (0.05, 0.10)  # EDM2's pair (Sec. 3.2)


def sgd_run(batches: list[int], seed: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """SGD on noisy linear regression, one step per entry of ``batches`` (samples per step).

    Yields the student (live parameters) and the samples seen after each step.
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(16, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    target = torch.randn(16, 4, generator=g)
    student = dict(model.named_parameters())
    seen = 0
    for batch in batches:
        x = torch.randn(batch, 16, generator=g)
        y = x @ target + 0.5 * torch.randn(batch, 4, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
        seen += batch
        yield student, seen


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().reshape(-1) for k in sorted(tensors)])


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def test_sigma_rel_and_gamma_match_edm2_and_the_profile_width() -> None:
    # EDM2 Sec. 3.2: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-12)
    n = torch.linspace(0.0, 1000.0, 200_001, dtype=torch.float64)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        p = power_profile(n, 1000.0, gamma)  # measured: mass 1, std / length = sigma_rel
        mean = torch.trapezoid(p * n, n)
        std = torch.trapezoid(p * (n - mean) ** 2, n).sqrt().item()
        assert torch.trapezoid(p, n).item() == pytest.approx(1.0, abs=1e-4)
        assert std / 1000.0 == pytest.approx(sigma_rel, rel=1e-3)


def test_inner_products_match_quadrature_and_do_not_overflow() -> None:
    ends, gammas = [1000.0, 3000.0, 2000.0], [6.94, 16.97, 0.5]
    closed = inner_products(ends, gammas, ends, gammas)
    for i in range(3):
        for j in range(3):  # the product lives on (0, shorter end]: a smooth integrand there
            n = torch.linspace(0.0, min(ends[i], ends[j]), 100_001, dtype=torch.float64)
            pi, pj = power_profile(n, ends[i], gammas[i]), power_profile(n, ends[j], gammas[j])
            assert closed[i, j].item() == pytest.approx(torch.trapezoid(pi * pj, n).item(),
                                                        rel=1e-6)
    # A short EMA (gamma ~ 1000) at a billion samples: N^(gamma+1) overflows float64, the
    # ratio form does not; scaling every length by c scales every product by 1/c.
    gamma = sigma_rel_to_gamma(0.001)
    big = inner_products([5e8, 1e9], [gamma, 6.94], [5e8, 1e9], [gamma, 6.94])
    small = inner_products([0.5, 1.0], [gamma, 6.94], [0.5, 1.0], [gamma, 6.94])
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big * 1e9, small, rtol=1e-9, atol=0)


def test_momentum_is_written_in_samples_seen() -> None:
    """beta = (1 - B/n)^(gamma+1): the first update copies, the next follow by hand."""
    student = {"w": torch.zeros(3)}
    ema = PowerEMA(student, [0.1])
    gamma = ema.gammas[0]
    expected = torch.zeros(3, dtype=torch.float64)
    for seen, batch, value in ((8, 8, 1.0), (16, 8, 2.0), (48, 32, 4.0)):
        student["w"].fill_(value)
        beta = (1.0 - batch / seen) ** (gamma + 1.0)
        assert ema.momenta(seen) == [pytest.approx(beta, rel=1e-14)]
        ema.update(seen)
        expected = beta * expected + (1.0 - beta) * value
        torch.testing.assert_close(ema.average(0)["w"].double(), expected, rtol=1e-6, atol=0)
    assert ema.average(0)["w"][0].item() != 1.0  # really averaged, not copied
    low = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)}  # fp32 accumulators
    ema = PowerEMA(low, [0.1])
    ema.update(8)
    low["w"].add_(1.0)
    ema.update(16)
    beta = 0.5 ** (gamma + 1.0)
    assert ema.average(0)["w"].dtype == torch.float32
    torch.testing.assert_close(ema.average(0)["w"], beta * torch.tensor([1.0, 2.0, 3.0])
                               + (1 - beta) * torch.tensor([2.0, 3.0, 4.0]), rtol=1e-6, atol=0)


def track(tmp_path: Path, batches: list[int], interval: int, dtype: str = "fp32",
          sigma_rels: tuple[float, ...] = TRACKED, extra: tuple[float, ...] = ()
          ) -> tuple[PostHocEMA, PowerEMA | None]:
    """An SGD run with a PostHocEMA (snapshots in tmp_path) and, optionally, more power EMAs
    tracked directly to compare reconstructions with."""
    posthoc, direct = None, None
    for student, seen in sgd_run(batches):
        if posthoc is None:
            posthoc = PostHocEMA(student, sigma_rels, tmp_path, interval, dtype)
            direct = PowerEMA(student, extra) if extra else None
        posthoc.step(seen)
        if direct is not None:
            direct.update(seen)
    assert posthoc is not None
    posthoc.finish()
    return posthoc, direct


def test_reconstructing_a_tracked_sigma_rel_gives_its_weights(tmp_path: Path) -> None:
    posthoc, _ = track(tmp_path, [8] * 300, interval=160)
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 2 * 15
    for i, sigma_rel in enumerate(TRACKED):
        plan = solve_reconstruction(snapshots, sigma_rel)
        assert plan.samples_seen == 2400 and plan.profile_error < 1e-6
        assert rel_error(reconstruct(plan), posthoc.ema.average(i)) <= 1e-3
        # Up to an earlier point: the snapshot of that EMA stored there.
        plan = solve_reconstruction(snapshots, sigma_rel, up_to=1000)
        assert plan.samples_seen == 960
        (stored,) = [s for s in snapshots if s.samples_seen == 960 and s.sigma_rel == sigma_rel]
        assert rel_error(reconstruct(plan), read_snapshot(stored)) <= 1e-3


def test_a_third_power_ema_is_reconstructed_from_the_other_two(tmp_path: Path) -> None:
    """sigma_rel 0.075 (between the tracked pair) and 0.15 (beyond it), tracked directly.

    Asserted: the error is within the Cauchy-Schwarz bound of the profile misfit r: since the
    fit has mass one, integral r = 0 and |integral r (theta - c)| <= ||r|| ||theta - c|| for any
    c (theta: each student held over its step's samples, c its mean); and it is within 0.5% of
    the distance between the tracked pair's averages, so a sweep over sigma_rel resolves
    lengths far closer together than the pair. Measured with 30 snapshots per EMA (fp32):
    0.02% (0.075) and 0.05% (0.15); the error grows as snapshots thin out.
    """
    posthoc, direct = track(tmp_path, [8] * 300, interval=80, extra=(0.075, 0.15))
    assert direct is not None
    snapshots = list_snapshots(tmp_path)
    spread = (flat(posthoc.ema.average(0)) - flat(posthoc.ema.average(1))).norm().item()
    students = torch.stack([flat(student) for student, _ in sgd_run([8] * 300)])
    theta = math.sqrt(8 * ((students - students.mean(0)) ** 2).sum().item())
    for i, sigma_rel in enumerate(direct.sigma_rels):
        plan = solve_reconstruction(snapshots, sigma_rel)
        assert sum(plan.coefficients) == pytest.approx(1.0, abs=1e-12)
        error = (flat(reconstruct(plan)) - flat(direct.average(i))).norm().item()
        target_norm = inner_products([2400], [plan.gamma], [2400], [plan.gamma]).sqrt().item()
        assert error <= plan.profile_error * target_norm * theta
        assert error / spread <= 0.005, (sigma_rel, error / spread)


@pytest.mark.parametrize(("dtype", "roundoff"), [("bf16", 2.0**-8), ("fp16", 2.0**-11)])
def test_low_precision_snapshots_cost_no_more_than_their_rounding(
        tmp_path: Path, dtype: str, roundoff: float) -> None:
    """Stored at unit roundoff u, a reconstruction moves by || rec(low) - rec(fp32) || <=
    u sum_i |x_i| ||snap_i|| at most (docs: bf16 rounding can exceed the gap between lengths)."""
    track(tmp_path / "fp32", [8] * 100, interval=80)
    track(tmp_path / dtype, [8] * 100, interval=80, dtype=dtype)
    full = solve_reconstruction(list_snapshots(tmp_path / "fp32"), 0.075)
    low = solve_reconstruction(list_snapshots(tmp_path / dtype), 0.075)
    assert low.coefficients == full.coefficients
    error = (flat(reconstruct(low)) - flat(reconstruct(full))).norm().item()
    bound = roundoff * sum(abs(x) * flat(read_snapshot(s)).norm().item()
                           for x, s in zip(full.coefficients, full.snapshots))
    assert 0 < error <= bound


def indicator_run(batches: list[int], block: int, interval: int, folder: Path,
                  sigma_rels: tuple[float, ...]) -> PostHocEMA:
    """A student whose coordinate m is 1 while the step's samples lie in block m (of ``block``
    samples): its average's coordinate m is the profile's weight on that block."""
    total = sum(batches)
    student = {"blocks": torch.zeros(total // block)}
    posthoc = PostHocEMA(student, sigma_rels, folder, interval)
    seen = 0
    for batch in batches:
        assert seen // block == (seen + batch - 1) // block, "a step inside one block"
        student["blocks"].zero_()[seen // block] = 1.0
        seen += batch
        posthoc.step(seen)
    posthoc.finish()
    return posthoc


def block_weights(end: int, gamma: float, block: int) -> torch.Tensor:
    """Integral of p(n; end, gamma) over each block: ((hi/N)^(g+1) - (lo/N)^(g+1))."""
    edges = torch.arange(0, end + 1, block, dtype=torch.float64) / end
    return edges[1:] ** (gamma + 1) - edges[:-1] ** (gamma + 1)


def test_profiles_match_in_samples_seen_at_kappa_1_and_4_and_under_a_batch_schedule(
        tmp_path: Path) -> None:
    """Same samples seen (2048), batch 8 (kappa 1), 32 (kappa 4), and 8 then 32 (progressive)."""
    runs = {"kappa1": [8] * 256, "kappa4": [32] * 64, "schedule": [8] * 128 + [32] * 32}
    block, interval = 32, 256
    averages, reconstructions = {}, {}
    for name, batches in runs.items():
        posthoc = indicator_run(batches, block, interval, tmp_path / name, TRACKED)
        averages[name] = [posthoc.ema.average(i)["blocks"].double() for i in range(2)]
        plan = solve_reconstruction(list_snapshots(tmp_path / name), 0.07)
        reconstructions[name] = (plan, reconstruct(plan)["blocks"].double())
    # The tracked EMAs: exactly the power profile per block, at every batch (fp32 rounding).
    for name in runs:
        for i, gamma in enumerate(sigma_rel_to_gamma(s) for s in TRACKED):
            torch.testing.assert_close(averages[name][i], block_weights(2048, gamma, block),
                                       rtol=0, atol=2e-6)
    # The reconstruction: the same coefficients and per-block weights at every batch ...
    plan1, weights1 = reconstructions["kappa1"]
    for name in ("kappa4", "schedule"):
        plan, weights = reconstructions[name]
        assert [s.samples_seen for s in plan.snapshots] == \
            [s.samples_seen for s in plan1.snapshots]
        assert plan.coefficients == plan1.coefficients  # a function of samples seen only
        torch.testing.assert_close(weights, weights1, rtol=0, atol=1e-5)
    # ... and they are the reconstructed profile, integrated over each block, close to the target.
    n = torch.linspace(0.0, 2048.0, 2048 * 64 + 1, dtype=torch.float64)
    density = plan1.profile(n).reshape(-1)[:-1].reshape(-1, block * 64).sum(1) / 64
    torch.testing.assert_close(weights1, density, rtol=0, atol=1e-3)
    # L1 misfit over blocks <= integral |r| <= sqrt(N) ||r|| (Cauchy-Schwarz)
    target_norm = inner_products([2048], [plan1.gamma], [2048], [plan1.gamma]).sqrt().item()
    assert (weights1 - block_weights(2048, plan1.gamma, block)).abs().sum().item() <= \
        math.sqrt(2048) * plan1.profile_error * target_norm + 1e-5


def test_resume_continues_bitwise(tmp_path: Path) -> None:
    """Interrupted at step 170 (saved through a safetensors file), resumed: the same averages
    and byte-identical snapshot files as an uninterrupted run."""
    batches = [8] * 300
    whole, _ = track(tmp_path / "whole", batches, interval=160)
    posthoc, state_file = None, tmp_path / "posthoc_ema.safetensors"
    for step, (student, seen) in enumerate(sgd_run(batches)):
        if step == 0:
            posthoc = PostHocEMA(student, TRACKED, tmp_path / "resumed", 160)
        assert posthoc is not None
        if step == 170:  # resume: a fresh tracker from the saved state
            save_file(posthoc.state_dict(), str(state_file))
            for extra in range(5):  # a snapshot the interrupted run wrote past its checkpoint
                posthoc.step(posthoc.ema.samples_seen + 160 * (extra + 1))
            posthoc = PostHocEMA(student, TRACKED, tmp_path / "resumed", 160)
            posthoc.load_state_dict(load_file(str(state_file)))
        posthoc.step(seen)
    assert posthoc is not None
    posthoc.finish()
    for i in range(2):
        for name, t in whole.ema.average(i).items():
            assert torch.equal(t, posthoc.ema.average(i)[name])
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == \
            (tmp_path / "resumed" / name).read_bytes()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_snapshots_round_trip_in_their_dtype_with_a_known_cost(tmp_path: Path,
                                                               dtype: str) -> None:
    # batch 24 does not divide the interval 100: a snapshot at the first step past each multiple
    posthoc, _ = track(tmp_path, [24] * 29, interval=100, dtype=dtype)
    snapshots = list_snapshots(tmp_path)
    times = sorted({s.samples_seen for s in snapshots})
    assert times == [120, 216, 312, 408, 504, 600, 696]  # 696: the end, stored by finish()
    assert [snapshot_due(t - 24, t, 100) for t in times] == [True] * 6 + [False]
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    last = [s for s in snapshots if s.samples_seen == 696]
    assert [(s.sigma_rel, s.dtype) for s in last] == [(0.05, dtype), (0.10, dtype)]
    for i, snapshot in enumerate(last):
        tensors = read_snapshot(snapshot)
        assert snapshot.gamma == sigma_rel_to_gamma(TRACKED[i])
        for name, t in posthoc.ema.average(i).items():
            assert tensors[name].dtype == want
            assert torch.equal(tensors[name], t.to(want))
    # Cost: tensors (16 * 4 + 4 numbers per EMA) plus a header of under 1 kB per file.
    per_snapshot = posthoc.bytes_per_snapshot()
    assert per_snapshot == 2 * 68 * want.itemsize == 2 * payload_bytes(
        posthoc.ema.average(0), dtype)
    assert 0 < disk_usage(tmp_path) - len(times) * per_snapshot < len(snapshots) * 1024
    assert posthoc.projected_bytes(696) == len(times) * per_snapshot
    assert posthoc.finish() == []  # the end is stored once


def test_an_fp16_overflow_is_refused_before_writing(tmp_path: Path) -> None:
    posthoc = PostHocEMA({"w": torch.full((3,), 1e6)}, TRACKED, tmp_path, 8, dtype="fp16")
    with pytest.raises(ValueError, match="^w is not finite in fp16: use bf16 or fp32 snapshots$"):
        posthoc.step(8)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_raise_one_clear_message(tmp_path: Path) -> None:
    track(tmp_path, [8] * 40, interval=100)
    snapshots = list_snapshots(tmp_path)
    for sigma_rel in (0.0, -0.1, 0.3, math.nan):
        with pytest.raises(ValueError, match=r"^sigma_rel must lie in \(0, 0.2887\]"):
            solve_reconstruction(snapshots, sigma_rel)
    with pytest.raises(ValueError, match="^no post-hoc EMA snapshot at or before 50 samples "
                                         r"seen \(the first is at 104\): ask for a later point"):
        solve_reconstruction(snapshots, 0.1, up_to=50)
    with pytest.raises(ValueError, match=r"^no post-hoc EMA snapshot given \(there are none\)"):
        solve_reconstruction(list_snapshots(tmp_path / "missing"), 0.1)
    student = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="^unknown snapshot dtype 'fp8'; valid: fp32, bf16, fp16$"):
        PostHocEMA(student, TRACKED, tmp_path, 100, dtype="fp8")
    with pytest.raises(ValueError, match="^the snapshot interval must be a positive number"):
        PostHocEMA(student, TRACKED, tmp_path, 0)
    with pytest.raises(ValueError, match="^sigma_rels must differ from one another"):
        PowerEMA(student, [0.1, 0.1])
    with pytest.raises(ValueError, match="^PowerEMA averages floating tensors only; n is "):
        PowerEMA({"n": torch.zeros(1, dtype=torch.long)}, TRACKED)
    ema = PowerEMA(student, TRACKED)
    ema.update(8)
    with pytest.raises(ValueError, match="^samples seen must grow from one update to the next: "
                                         "got 8 after 8$"):
        ema.update(8)
    with pytest.raises(ValueError, match=r"^the saved power EMAs have sigma_rels \(0.05, 0.1\), "
                                         r"this run \(0.1,\): resume with the same"):
        PowerEMA(student, [0.1]).load_state_dict(ema.state_dict())


def test_a_damaged_snapshot_is_named(tmp_path: Path) -> None:
    track(tmp_path, [8] * 40, interval=100)
    victim = list_snapshots(tmp_path)[0].path
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated: a real damaged file
    with pytest.raises(ValueError, match=f"^post-hoc EMA snapshot {re.escape(str(victim))} "
                                         "is damaged"):
        reconstruct(solve_reconstruction(list_snapshots(tmp_path), 0.1))


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
import torch
from ssl_ema.posthoc import PostHocEMA
posthoc = PostHocEMA({"w": torch.arange(1000.0)}, (0.05, 0.10), Path(sys.argv[1]), 8)
posthoc.step(8)  # two whole snapshots
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed before the next rename
posthoc.step(16)
"""


def test_a_run_killed_mid_write_leaves_only_whole_snapshots(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], env=env)
    assert done.returncode == -9
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-000000000000016-ema0.safetensors",
        "000000000000008-ema0.safetensors", "000000000000008-ema1.safetensors"]
    snapshots = list_snapshots(tmp_path)
    assert [s.samples_seen for s in snapshots] == [8, 8]
    assert torch.equal(reconstruct(solve_reconstruction(snapshots, 0.07))["w"],
                       torch.arange(1000.0))  # one student seen: every length is that student
    assert discard_after(tmp_path, 8) == [tmp_path / ".tmp-000000000000016-ema0.safetensors"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 kB tmpfs (needs the right to mount; skipped where there is none)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_with_one_line_and_keeps_earlier_snapshots(small_disk: Path) -> None:
    student = {"w": torch.zeros(2000)}  # 8 kB per fp32 snapshot: the 64 kB disk fills up
    posthoc = PostHocEMA(student, TRACKED, small_disk, 8)
    written, seen = [], 0
    with pytest.raises(SnapshotWriteError) as raised:
        while True:
            seen += 8
            written += posthoc.step(seen)
    message = str(raised.value)
    assert message.startswith(f"could not write post-hoc EMA snapshot {small_disk}/")
    assert message.endswith(f": No space left on device; the earlier snapshots in {small_disk} "
                            "are intact; free space or make it writable, then resume")
    assert len(written) >= 4  # earlier snapshots, and perhaps one EMA of the failed one: whole
    on_disk = sorted(small_disk.iterdir())
    assert set(written) <= set(on_disk) and len(on_disk) - len(written) <= 1
    assert not [p for p in on_disk if p.name.startswith(".tmp-")]
    for snapshot in list_snapshots(small_disk):
        assert torch.equal(read_snapshot(snapshot)["w"], torch.zeros(2000))


TWO_PROCESSES = """
import gc, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from ssl_ema.posthoc import PostHocEMA, SnapshotWriteError
dist.init_process_group("gloo")
rank = dist.get_rank()

def agree(ok):  # what the trainer passes: every process's flag, the minimum
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)

posthoc = PostHocEMA({"w": torch.zeros(2000)}, (0.05, 0.1), Path(sys.argv[1]), 8,
                     write=rank == 0, agree=agree)
seen = 0
try:
    while seen < 10_000:
        seen += 8
        posthoc.step(seen)
except SnapshotWriteError as e:
    print(json.dumps({"rank": rank, "seen": seen, "error": str(e)}))
# As engine/launch.py: free the process group while the interpreter is alive, or a gloo worker
# thread still freeing a finished all_reduce can meet finalisation and abort the rank
# (pytorch/pytorch#179291; rank 1 exited -6 in 1 of 3 fresh-clone CI runs).
del posthoc
dist.destroy_process_group()
gc.collect()
"""


def test_a_full_disk_stops_every_process_at_the_same_step(small_disk: Path) -> None:
    """Two real processes (gloo), the main one writing to a full disk: both stop at the step
    whose snapshot failed, each with one line; without the agreement the other process would
    train on (and wait in the next all-reduce for a main process that has gone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(small_disk)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    lines = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    main, other = lines
    assert main["seen"] == other["seen"] < 10_000  # the same step, before the loop's end
    assert "No space left on device" in main["error"]
    assert other["error"].startswith("the main process could not write a post-hoc EMA snapshot")
