#!/usr/bin/env python
"""Noisy-quadratic check of the EMA Scaling Rule.

    python tools/noisy_quadratic.py [--out runs/noisy_quadratic] [--coupling C] [--replicas N]
                                    [--json PATH]

Busbridge et al., "How to Scale Your EMA" (NeurIPS 2023), Sec. 3: when the batch grows by kappa,
SGD's lr becomes lr * kappa and every EMA momentum rho becomes rho ** kappa; an SDE argument then
says the iterate *and* its EMA follow the same trajectory as a function of samples seen, also when
the EMA feeds back into training. Keeping rho (the usual practice) makes the EMA kappa times
slower in samples, so its trajectory no longer matches.

Setup, many independent float64 replicas at once: loss L(x) = 1/2 x^T A x with A = diag(a), a
per-sample gradient noise sigma * N(0, I) (a batch of kappa reference batches averages kappa
of them), SGD x <- x - lr * (A x + c (x - e) + noise) and EMA e <- rho e + (1 - rho) x. With
coupling c > 0 the student is pulled towards its EMA, as by a BYOL / pseudo-label teacher. All
runs read the same per-sample noise stream (common random numbers), so kappa-runs are compared
replica by replica and the reported noise level is the standard error of that paired difference.
The kappa=1 run is the reference; trajectories are recorded every 16 reference batches.
What remains under the rule is the O(lr * kappa) discretisation error of the SDE approximation
(it grows about linearly with kappa - 1): systematic, so well above that paired noise level.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ssl_ema.scaling import ScalingRule, scale_momentum, scale_optimizer

KAPPAS: tuple[int, ...] = (1, 2, 4, 8, 16)
BLOCK = 16  # record every BLOCK reference batches: a whole number of steps at every kappa
TOLERANCE = 0.03  # max normalised deviation accepted as "matches kappa=1"
SEPARATION = 5.0  # without the EMA rule, kappa=8 and 16 must deviate by SEPARATION x TOLERANCE


@dataclass(frozen=True)
class Setup:
    """Base hyperparameters at the reference batch (kappa = 1); one sample = one reference batch."""

    curvature: tuple[float, float] = (1.0, 0.5)  # time scales 1/(lr a): 500 and 1000 samples
    lr: float = 0.002  # lr * kappa * a <= 0.032 at kappa=16: inside the SDE regime
    momentum: float = 0.995  # EMA horizon 1/(1 - rho) = 200 samples, same order as training
    noise: float = 5.0  # per-sample gradient noise std: a visible noise floor in the loss
    start: tuple[float, float] = (1.0, 1.0)
    samples: int = 3200
    replicas: int = 2000
    seed: int = 0


@dataclass
class Trajectory:
    """Per-replica student x and EMA e, shape (checkpoints, replicas, 2), at ``samples``."""

    kappa: int
    rule: str
    lr: float
    momentum: float
    samples: torch.Tensor
    student: torch.Tensor
    ema: torch.Tensor
    curvature: torch.Tensor

    def loss(self, which: str = "ema") -> torch.Tensor:
        """Per-replica loss 1/2 x^T A x of the student or the EMA, shape (checkpoints, replicas)."""
        z = self.ema if which == "ema" else self.student
        return 0.5 * (self.curvature * z**2).sum(-1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors: extra threads only add synchronisation, which stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def simulate(kappa: int, rule: ScalingRule, *, coupling: float = 0.0,
             setup: Setup | None = None) -> Trajectory:
    """Run SGD + EMA at batch kappa (in reference batches) under a scaling rule."""
    setup = setup or Setup()
    if kappa not in KAPPAS:
        raise ValueError(f"kappa must be one of {KAPPAS}, got {kappa}")
    if setup.samples % BLOCK:
        raise ValueError(f"samples must be a multiple of {BLOCK}, got {setup.samples}")
    lr = scale_optimizer("sgd", kappa, lr=setup.lr, rule=rule).lr.value
    rho = scale_momentum(setup.momentum, kappa if rule == "ema" else 1).value
    gen = torch.Generator().manual_seed(setup.seed)
    f64 = torch.float64
    a = torch.tensor(setup.curvature, dtype=f64)
    x = torch.tensor(setup.start, dtype=f64).expand(setup.replicas, 2).clone()
    e = x.clone()
    students, emas = [x], [e]  # no in-place updates below, so the entries stay as recorded
    for _ in range(setup.samples // BLOCK):
        # the same per-sample noise for every kappa: a batch averages kappa consecutive samples
        z = torch.randn(BLOCK // kappa, kappa, setup.replicas, 2, generator=gen, dtype=f64)
        for g_noise in setup.noise * z.mean(1):
            x = x - lr * (a * x + coupling * (x - e) + g_noise)
            e = rho * e + (1.0 - rho) * x
        students.append(x)
        emas.append(e)
    samples = torch.arange(0, setup.samples + 1, BLOCK, dtype=torch.float64)
    return Trajectory(kappa, rule, lr, rho, samples, torch.stack(students), torch.stack(emas), a)


@dataclass(frozen=True)
class Deviation:
    """Max over checkpoints of |kappa-run - kappa=1 run| / scale of the kappa=1 curve, with the
    paired Monte-Carlo standard error on the same scale; for the EMA's loss and mean and the
    student's loss."""

    rule: str
    kappa: int
    lr: float
    momentum: float
    loss_dev: float
    loss_se: float
    mean_dev: float
    mean_se: float
    student_dev: float
    student_se: float


def _paired(run: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |mean difference|, max standard error), both over checkpoints, normalised by the
    reference's largest |replica mean|. ``run``/``ref`` have the replicas on dim 1."""
    diff = run - ref
    scale = ref.mean(1).abs().max()
    se = diff.std(1) / diff.shape[1] ** 0.5
    return float(diff.mean(1).abs().max() / scale), float(se.max() / scale)


@_one_thread()
def compare(coupling: float = 0.0, setup: Setup | None = None,
            rules: tuple[ScalingRule, ...] = ("ema", "optimizer", "none"),
            kappas: tuple[int, ...] = KAPPAS) -> tuple[list[Deviation], dict[str, list[float]]]:
    """Deviation of every (rule, kappa) run from kappa=1, plus the mean EMA loss curves
    (keys ``samples`` and ``rule/kappa``)."""
    ref = simulate(1, "ema", coupling=coupling, setup=setup)  # kappa=1 is the same for every rule
    curves = {"samples": ref.samples.tolist()}
    rows = []
    for rule in rules:
        for k in kappas:
            run = ref if k == 1 else simulate(k, rule, coupling=coupling, setup=setup)
            loss = _paired(run.loss(), ref.loss())
            mean = _paired(run.ema, ref.ema)
            student = _paired(run.loss("student"), ref.loss("student"))
            rows.append(Deviation(rule, k, run.lr, run.momentum, *loss, *mean, *student))
            curves[f"{rule}/{k}"] = run.loss().mean(1).tolist()
    return rows, curves


def verdict(rows: list[Deviation]) -> dict:
    """The claim checked: every EMA-rule run within TOLERANCE (EMA loss and mean), while without
    the rule (``optimizer``) kappa=8 and 16 deviate by at least SEPARATION x TOLERANCE."""
    with_rule = max(max(r.loss_dev, r.mean_dev) for r in rows if r.rule == "ema")
    without = {r.kappa: max(r.loss_dev, r.mean_dev) for r in rows
               if r.rule == "optimizer" and r.kappa in (8, 16)}
    holds = with_rule <= TOLERANCE and min(without.values()) >= SEPARATION * TOLERANCE
    return {"with_rule": with_rule, "without_rule": without, "holds": holds}


def table(rows: list[Deviation]) -> str:
    lines = [f"{'rule':<10} {'kappa':>5} {'lr':>8} {'rho':>8} {'EMA loss dev':>12} "
             f"{'(se)':>8} {'EMA mean dev':>12} {'(se)':>8} {'student loss':>12} {'(se)':>8}"]
    for r in rows:
        lines.append(f"{r.rule:<10} {r.kappa:>5} {r.lr:>8.4g} {r.momentum:>8.4f} "
                     f"{r.loss_dev:>12.4f} {r.loss_se:>8.4f} {r.mean_dev:>12.4f} {r.mean_se:>8.4f} "
                     f"{r.student_dev:>12.4f} {r.student_se:>8.4f}")
    return "\n".join(lines)


def plot(curves: dict[str, list[float]], coupling: float, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("error: the plot needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[dev]'), or pass --no-plot") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    titles = {"ema": "EMA Scaling Rule: lr*kappa, rho**kappa",
              "optimizer": "without it: lr*kappa, rho unchanged"}
    for ax, (rule, title) in zip(axes, titles.items()):
        for k in KAPPAS:
            ax.plot(curves["samples"], curves[f"{rule}/{k}"], label=f"kappa={k}", lw=1.2)
        ax.set(title=title, xlabel="samples seen (reference batches)", yscale="log")
        ax.legend()
    axes[0].set_ylabel("EMA expected loss")
    fig.suptitle(f"Noisy quadratic, coupling c={coupling:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/noisy_quadratic"))
    parser.add_argument("--coupling", type=float, default=0.0,
                        help="pull c (x - e) of the student towards its EMA (default 0)")
    parser.add_argument("--replicas", type=int, default=Setup.replicas)
    parser.add_argument("--seed", type=int, default=Setup.seed)
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the result here (tools/reproduce.py's record)")
    return parser


def resolve(argv: list[str]) -> dict:
    """What the result depends on, defaults filled in (tools/reproduce.py keys its record on
    it): the whole Setup, the coupling and the claim's thresholds; not where files go."""
    args = build_parser().parse_args(argv)
    return {"setup": asdict(Setup(replicas=args.replicas, seed=args.seed)),
            "coupling": args.coupling, "kappas": list(KAPPAS), "tolerance": TOLERANCE,
            "separation": SEPARATION}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.coupling < float("inf"):
        parser.error(f"--coupling must be a finite number >= 0, got {args.coupling}")
    setup = Setup(replicas=args.replicas, seed=args.seed)
    if args.coupling >= 1.0 / (setup.lr * max(KAPPAS)) - max(setup.curvature):
        parser.error(f"--coupling {args.coupling:g} too large: lr * 16 * (a + c) must stay < 1")
    if args.replicas < 2 or not 0 <= args.seed < 2**63:
        parser.error("--replicas must be >= 2 and --seed in [0, 2**63)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    rows, curves = compare(args.coupling, setup)
    claim = verdict(rows)
    print(f"noisy quadratic, coupling {args.coupling:g}, {setup.replicas} replicas, "
          f"{setup.samples} samples; max deviation from kappa=1 / its scale (paired s.e.)")
    print(table(rows))
    print(f"{'holds' if claim['holds'] else 'FAILS'}: with the EMA rule max deviation "
          f"{claim['with_rule']:.4f} <= {TOLERANCE} at every kappa; without it "
          f"{claim['without_rule'][8]:.4f} (kappa=8), {claim['without_rule'][16]:.4f} (kappa=16)"
          f" >= {SEPARATION:g} x {TOLERANCE}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"setup": asdict(setup), "coupling": args.coupling, "tolerance": TOLERANCE,
              "claim": claim, "rows": [asdict(r) for r in rows], "curves": curves}
    (args.out / "noisy_quadratic.json").write_text(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(curves, args.coupling, args.out / "noisy_quadratic.png")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
