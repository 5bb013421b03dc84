"""Time one EMA update of ``ssl_ema.EMA`` against peer libraries, in ms and in "x limit".

An EMA update ``teacher <- m * teacher + (1 - m) * student`` does almost no arithmetic: it is
bound by memory bandwidth. The least traffic any implementation can move for P fp32 parameters
and K momenta is (1 + 2K) * P * 4 bytes: read the student once, read and write each teacher once
(3 * P * 4 bytes for K = 1, 11 * P * 4 for K = 5). "x limit" is the measured time divided by that
traffic over the device's measured copy bandwidth (``dst.copy_(src)`` on a large buffer, counting
read + write). 1.0x is the hardware floor; the rest is extra passes (mul_ then add_ is two) and
per-tensor launch / Python overhead. The goal on an H100 is <= 1.3x for one momentum and for five.

Only parameters are counted. Ours (buffers="own") and lightly touch parameters only; timm's
ModelEmaV3 (default settings) also lerps floating buffers and copies integer ones, and torch's
AveragedModel (use_buffers=False) copies every buffer at each update: that traffic is charged to
them (the buffer count is printed; it is small next to the weights). Peers have no multi-momentum
update, so for K momenta they run K independent EMA objects, reading the student K times: their
floor is 3K / (1 + 2K) x limit (1.36x at K = 5), and so is ours by default; ours with
``fused=True`` stages the student once and updates all K in one compiled kernel: (3 + 2K) / (1 + 2K)
(1.18x at K = 5, but 1.67x at K = 1, where the plain foreach path is the one to use).

Models are timm models with random init and their default 1000-class heads, as in the reference
table of ../shared/GPU.md. Before timing, ours and lightly's ``update_momentum`` are run once from
identical teachers on a perturbed student and must agree within 1e-6 (exit 1 otherwise), so the
bench never reports a fast wrong kernel.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ssl_ema.ema import EMA

MODELS = ("resnet18", "resnet50", "vit_base_patch16_224")
MOMENTA = (0.968, 0.984, 0.992, 0.996, 0.998)  # K = 5; K = 1 uses 0.996
TOL = 1e-6
Update = Callable[[], None]
Maker = Callable[[nn.Module, nn.Module, Sequence[float]], Update | None]


class CheckError(RuntimeError):
    """Ours and lightly's teachers disagree after one update."""


def limit_bytes(num_params: int, k: int, itemsize: int = 4) -> int:
    """Least bytes moved by K EMA updates of P parameters: read student once, r+w each teacher."""
    return (1 + 2 * k) * num_params * itemsize


def time_ms(fn: Update, device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (2 x buffer size)."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _clones(model: nn.Module, n: int) -> list[nn.Module]:
    return [copy.deepcopy(model) for _ in range(n)]


@torch.no_grad()
def perturbed(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """A copy of ``model`` with noise on every parameter (a student one step away from init)."""
    student = copy.deepcopy(model)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for p in student.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    return student


@torch.no_grad()
def check_against_lightly(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> float:
    """Max |ours - lightly| over all teachers after one update; raises CheckError above TOL."""
    from lightly.models.utils import update_momentum

    ours, ref = _clones(init, len(momenta)), _clones(init, len(momenta))
    EMA(student, ours).update(list(momenta))
    for teacher, m in zip(ref, momenta):
        update_momentum(student, teacher, m)
    err = max((a - b).abs().max().item() for t_a, t_b in zip(ours, ref)
              for a, b in zip(t_a.parameters(), t_b.parameters()))
    if not err <= TOL:
        raise CheckError(f"ssl_ema.EMA disagrees with lightly.update_momentum: max |diff| = "
                         f"{err:.3g} > {TOL:g}")
    return err


def _all(calls: Sequence[Update]) -> Update:
    """One update of K independent EMA objects: call each in turn."""
    def update() -> None:
        for call in calls:
            call()
    return update


def make_ours(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> Update:
    ema = EMA(student, _clones(init, len(momenta)))
    return partial(ema.update, list(momenta))


def make_ours_fused(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> Update:
    """Flat teacher storage + one compiled kernel (reads the student once for all K)."""
    ema = EMA(student, _clones(init, len(momenta)), fused=True)
    ema.update(list(momenta))  # compile outside the timing
    return partial(ema.update, list(momenta))


def make_flat(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> Update:
    flat_s = torch.cat([p.detach().flatten() for p in student.parameters()])
    flats = [torch.cat([p.detach().flatten() for p in init.parameters()]) for _ in momenta]
    return _all([partial(t.lerp_, flat_s, 1.0 - m) for t, m in zip(flats, momenta)])


def make_lightly(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> Update:
    from lightly.models.utils import update_momentum

    teachers = _clones(init, len(momenta))
    return _all([partial(update_momentum, student, t, m) for t, m in zip(teachers, momenta)])


def make_timm(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> Update:
    from timm.utils import ModelEmaV3

    emas = [ModelEmaV3(init, decay=m) for m in momenta]  # update(step=None) uses decay as given
    return _all([partial(e.update, student) for e in emas])


def make_averaged(init: nn.Module, student: nn.Module, momenta: Sequence[float]) -> Update:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avgs = [AveragedModel(init, multi_avg_fn=get_ema_multi_avg_fn(m)) for m in momenta]
    for a in avgs:  # the first call only copies the model in; later calls average
        a.update_parameters(student)
    return _all([partial(a.update_parameters, student) for a in avgs])


def make_ema_pytorch(init: nn.Module, student: nn.Module,
                     momenta: Sequence[float]) -> Update | None:
    try:
        from ema_pytorch import EMA as EmaPytorch
    except ImportError:
        return None
    emas = [EmaPytorch(student, ema_model=copy.deepcopy(init), beta=m, update_after_step=0,
                       update_every=1) for m in momenta]
    for e in emas:  # the first update copies in (its decay also warms up: timing is unaffected)
        e.update()
    return _all([e.update for e in emas])


# (label, tensors it updates, maker)
IMPLEMENTATIONS: list[tuple[str, str, Maker]] = [
    ("ssl_ema.EMA", "params", make_ours),
    ("ssl_ema.EMA fused=True", "params", make_ours_fused),
    ("flat lerp_ (reference)", "params", make_flat),
    ("lightly.update_momentum", "params", make_lightly),
    ("timm ModelEmaV3", "params+buffers", make_timm),
    ("torch AveragedModel (ema)", "params+buffer copy", make_averaged),
    ("ema_pytorch.EMA", "params+buffers", make_ema_pytorch),
]


def bench_model(name: str, model: nn.Module, device: torch.device, bandwidth: float,
                repeats: int, warmup: int, ks: Sequence[int] = (1, len(MOMENTA))) -> dict[str, Any]:
    """Check ours against lightly, then time every implementation at each K in ``ks``."""
    init = model.to(device).float()
    student = perturbed(init)
    num_params = sum(p.numel() for p in init.parameters())
    num_buffers = sum(b.numel() for b in init.buffers())
    err = check_against_lightly(init, student, MOMENTA)
    rows = []
    for k in ks:
        momenta = MOMENTA[:k] if k > 1 else (0.996,)
        limit_ms = limit_bytes(num_params, k) / bandwidth * 1e3
        for label, touches, maker in IMPLEMENTATIONS:
            update = maker(init, student, momenta)
            row: dict[str, Any] = {"implementation": label, "k": k, "touches": touches,
                                   "limit_ms": limit_ms}
            if update is None:
                row.update(ms=None, x_limit=None, note="not installed: skipped")
            else:
                ms = time_ms(update, device, repeats, warmup)
                row.update(ms=ms, x_limit=ms / limit_ms)
            rows.append(row)
            del update
            gc.collect()
    return {"model": name, "params": num_params, "buffers": num_buffers,
            "mb": num_params * 4 / 1e6, "bandwidth_gbs": bandwidth / 1e9,
            "check_max_abs_diff": err, "rows": rows}


def print_result(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: {res['params']:,} parameters ({res['mb']:.1f} MB fp32), "
          f"{res['buffers']:,} buffer elements, copy bandwidth {res['bandwidth_gbs']:.1f} GB/s, "
          f"|ours - lightly| = {res['check_max_abs_diff']:.2g}")
    print(f"  {'implementation':<30} {'K':>2} {'touches':<19} {'ms/update':>10} {'x limit':>8}")
    for r in res["rows"]:
        ms = f"{r['ms']:10.3f}" if r["ms"] is not None else f"{'-':>10}"
        x = f"{r['x_limit']:7.2f}x" if r["x_limit"] is not None else f"{'-':>8}"
        note = f"  ({r['note']})" if r.get("note") else ""
        print(f"  {r['implementation']:<30} {r['k']:>2} {r['touches']:<19} {ms} {x}{note}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> _Parser:
    p = _Parser(prog="bench_ema.py", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL",
                   help=f"timm models, random init, default heads (choices: {', '.join(MODELS)})")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32",), default="float32",
                   help="weight dtype (the 4-byte limit and the 1e-6 check assume float32)")
    p.add_argument("--repeats", type=int, default=20, help="timed updates (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    return p


def resolve(argv: Sequence[str]) -> dict[str, Any]:
    """What the result depends on, defaults filled in (tools/reproduce.py keys its record on
    it); not where it is written. Pass --device: its default depends on the machine."""
    args = vars(build_parser().parse_args(argv))
    args.pop("json")
    return {**args, "momenta": list(MOMENTA), "tolerance": TOL}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available (use --device cpu)")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import lightly
    import timm

    device = torch.device(args.device)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    print(f"device {device}, torch {torch.__version__}, timm {timm.__version__}, "
          f"lightly {lightly.__version__}; median of {args.repeats} after {args.warmup} warm-up")
    results = []
    for name in args.models:
        try:
            res = bench_model(name, timm.create_model(name, pretrained=False), device, bandwidth,
                              args.repeats, args.warmup)
        except CheckError as exc:
            print(f"bench_ema.py: {name}: {exc}", file=sys.stderr)
            return 1
        print_result(res)
        results.append(res)
        gc.collect()
    print("\nx limit = ms / ((1 + 2K) x params x 4 B / copy bandwidth); parameters only. timm "
          "ModelEmaV3 also lerps float buffers, AveragedModel copies all buffers each update.\n"
          "Peers run K independent EMAs (K student reads): their floor is 3K/(1+2K) x limit.")
    if device.type == "cpu":
        print("CPU: copy_ also reads dst into cache (write-allocate), so the probe under-states "
              "bandwidth and x limit can fall below 1; compare with the flat lerp_ row.")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": str(device), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
