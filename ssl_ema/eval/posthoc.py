"""Post-hoc EMAs of a run scored beside its tracked models (``tools/posthoc_ema.py``).

Each requested sigma_rel is reconstructed from the run's snapshots (`ssl_ema.posthoc`) into a
copy of the teacher's modules (the power EMAs average `student_for_ema`, which has the
teacher's structure) and scored with the run's own protocol: weighted kNN of backbone features
for the self-supervised methods (the trainer's ``knn_*``), the run's own classifier for the
classification methods (top-1, ECE, NLL: `own_classifier.classifier_protocol`). Every model,
tracked or reconstructed, is scored with its own BatchNorm statistics and, as ``<role>+bn``,
with statistics recomputed on training images, as the trainer does for every EMA
(Morales-Brotons et al. 2024, Sec. 5); a reconstruction's averaged statistics belong to no
single network, so its ``+bn`` score is the one to read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ssl_ema.config import ConfigError
from ssl_ema.data.datasets import DataBundle, build_data
from ssl_ema.ema import recompute_batchnorm
from ssl_ema.eval.context import roles as run_roles
from ssl_ema.eval.own_classifier import BN_BATCH, BN_SUFFIX, classifier_protocol
from ssl_ema.eval.protocols import embed, knn_protocol
from ssl_ema.eval.trained import TrainedRun
from ssl_ema.methods.registry import method_data
from ssl_ema.posthoc import Reconstruction, reconstruct

PREFIX = "posthoc_"
# Columns of the table and the JSON, per protocol: what the run's own evaluation reports.
# (Classification runs with a validation split also report its accuracy, "val_accuracy".)
COLUMNS = {"knn": ("accuracy",), "classify": ("accuracy", "ece_15", "ece_100", "nll")}


def role_of(sigma_rel: float) -> str:
    return f"{PREFIX}{sigma_rel:g}"


def reconstructed_model(run: TrainedRun, plan: Reconstruction) -> nn.ModuleDict:
    """The teacher's modules holding the reconstruction of ``plan`` (float32)."""
    model = deepcopy(run.method.teacher)
    weights = reconstruct(plan)
    state = model.state_dict()
    odd = sorted({n for n, t in state.items() if t.is_floating_point()} ^ set(weights))
    if odd:
        raise ConfigError(f"the post-hoc EMA snapshots of {run.run_dir} hold other tensors than "
                          f"its model ({len(odd)} differ, e.g. {odd[0]}); they belong to another "
                          "run")
    model.load_state_dict(weights, strict=False)  # integer buffers (BN's counters) stay
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Scored:
    """The run's protocol, the score of every model, and the fair floor the run recorded."""

    protocol: str  # "knn" | "classify"
    metrics: dict[str, dict[str, float]]  # role (and role+bn) -> COLUMNS[protocol]
    floor: float | None


def _knn(models: Mapping[str, nn.ModuleDict], run: TrainedRun, data: DataBundle,
         device: torch.device, bn_batches: int) -> dict[str, dict[str, float]]:
    cfg, out = run.cfg, {}
    for role, model in models.items():
        backbone = model["backbone"].to(device)
        for suffix in ("", BN_SUFFIX):
            if suffix:
                bank = DataLoader(data.train_eval, batch_size=BN_BATCH,
                                  num_workers=cfg.data.num_workers)
                recompute_batchnorm(backbone, bank, bn_batches, device)
            feats = embed(backbone, data.train_eval, data.test_eval, data.num_classes, None,
                          num_workers=cfg.data.num_workers)
            result = knn_protocol(feats, cfg.eval.knn_k, cfg.eval.knn_temperature)
            out[role + suffix] = {"accuracy": result.metrics["accuracy"]}
    return out


def _classify(models: Mapping[str, nn.ModuleDict], run: TrainedRun, data: DataBundle,
              device: torch.device, bn_batches: int) -> dict[str, dict[str, float]]:
    nets = {r: nn.Sequential(m["backbone"], m["classifier"]) for r, m in models.items()}
    results = classifier_protocol(nets, data, device, bn_batches, run.cfg.data.num_workers)
    return {r: {c: float(p.metrics[c]) for c in (*COLUMNS["classify"], "val_accuracy")
                if c in p.metrics} for r, p in results.items()}


def score_models(run: TrainedRun, posthoc: Mapping[str, nn.ModuleDict], device: torch.device,
                 bn_batches: int) -> Scored:
    """The run's tracked models (teacher, student, EMA copies) and ``posthoc``, scored alike."""
    protocol = run.method.evaluation
    models = {**run_roles(run.method, run.cfg.ema.extra_momenta), **posthoc}
    models = {r: deepcopy(m) for r, m in models.items()}  # recomputation changes buffers
    data = build_data(run.cfg, method_data(run.cfg))
    score = _knn if protocol == "knn" else _classify
    return Scored(protocol, score(models, run, data, device, bn_batches), recorded_floor(run))


def recorded_floor(run: TrainedRun) -> float | None:
    """The floor the run measured before training: random weights with BatchNorm recomputed
    (``knn_random_bn``, kNN runs), else the random student's test accuracy (classification)."""
    path = run.run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "eval" and event.get("step") == 0:
            for key in ("knn_random_bn", "acc_student_test_bn", "acc_student_test"):
                if key in event:
                    return float(event[key])
    return None


def table(scored: Scored, plans: Sequence[Reconstruction]) -> str:
    """The console table: tracked models, then the reconstructions, each ± BN recomputed."""
    first = next(iter(scored.metrics.values()))
    cols = [c for c in ("val_accuracy", *COLUMNS[scored.protocol]) if c in first]
    errors = {role_of(p.sigma_rel): p.profile_error for p in plans}
    lines = [f"{'model':<22}{'profile err':>12}" + "".join(f"{c:>13}{c + '+bn':>16}"
                                                           for c in cols)]
    for role, own in scored.metrics.items():
        if role.endswith(BN_SUFFIX):
            continue
        bn = scored.metrics.get(role + BN_SUFFIX, {})
        err = f"{errors[role]:>12.2e}" if role in errors else f"{'-':>12}"
        lines.append(f"{role:<22}{err}" + "".join(
            f"{own[c]:>13.4f}" + (f"{bn[c]:>16.4f}" if c in bn else f"{'-':>16}") for c in cols))
    if scored.floor is not None:
        name = "fair floor" if scored.protocol == "knn" else "random init"
        lines.append(f"{name:<22}{'-':>12}" + " " * 29 * cols.index("accuracy")
                     + f"{scored.floor:>13.4f}")
    return "\n".join(lines)


def best_posthoc(scored: Scored) -> str | None:
    """The reconstruction with the highest test accuracy, BatchNorm recomputed."""
    found = {r: m["accuracy"] for r, m in scored.metrics.items()
             if r.startswith(PREFIX) and r.endswith(BN_SUFFIX)}
    return max(found, key=found.__getitem__) if found else None


def plot_sweep(scored: Scored, sigma_rels: Sequence[float], out: Path, title: str) -> None:
    """Accuracy (BatchNorm recomputed) against sigma_rel, the tracked models as lines; the
    floor drawn when it is near them, else named in the legend (it would flatten the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def acc(role: str) -> float:
        return scored.metrics.get(role + BN_SUFFIX, scored.metrics[role])["accuracy"]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sweep = [acc(role_of(s)) for s in sigma_rels]
    ax.plot(sigma_rels, sweep, "o-", color="C0", label="post-hoc EMA (+bn)")
    tracked = [r for r in scored.metrics if not r.endswith(BN_SUFFIX) and not r.startswith(PREFIX)]
    styles = {"teacher": ("C1", "-"), "student": ("C2", "--")}
    for i, role in enumerate(tracked):
        color, style = styles.get(role, (f"C{3 + i}", ":"))
        ax.axhline(acc(role), color=color, linestyle=style, linewidth=1, label=f"{role} (+bn)")
    values = sweep + [acc(r) for r in tracked]
    low, high = min(values), max(values)
    pad = max(0.01, 0.1 * (high - low))
    if scored.floor is not None:
        name = "fair floor" if scored.protocol == "knn" else "random init"
        if scored.floor >= low - 5 * pad:
            ax.axhline(scored.floor, color="grey", linestyle="-.", linewidth=1, label=name)
            low = min(low, scored.floor)
        else:
            ax.plot([], [], " ", label=f"{name} {scored.floor:.3f} (off the scale)")
    ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    ax.set_xlabel("σ_rel (EMA width / length of training)")
    ax.set_ylabel("test accuracy" + (" (kNN)" if scored.protocol == "knn" else ""))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def document(scored: Scored, plans: Sequence[Reconstruction], run: TrainedRun,
             bn_batches: int) -> dict[str, Any]:
    """The JSON the tool writes."""
    return {"run": str(run.run_dir), "checkpoint": run.checkpoint.name,
            "protocol": scored.protocol, "recompute_bn_batches": bn_batches,
            "fair_floor": scored.floor, "results": scored.metrics,
            "best_posthoc": best_posthoc(scored),
            "posthoc": {f"{p.sigma_rel:g}": {
                "gamma": p.gamma, "samples_seen": p.samples_seen,
                "profile_error": p.profile_error, "snapshots": len(p.snapshots),
                "coefficients": list(p.coefficients)} for p in plans}}
