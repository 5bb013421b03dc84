#!/usr/bin/env python
"""Evaluate the teacher and the student of trained runs (frozen features or own classifier).

    python tools/eval.py runs/quickstart/20261123-120000 --protocol knn
    python tools/eval.py RUN_A RUN_B --protocol linear --roles teacher student
    python tools/eval.py SUP_SEED0 SUP_SEED1 --protocol classifier --roles student ema_0.75

CHECKPOINT is a run directory (its newest intact checkpoint) or one of its ``checkpoints/step_*``
folders. ``knn``: weighted kNN (k and temperature from the run's config unless given), the same
numbers the trainer reports. ``linear``: logistic-regression probe, with ECE (15 and 100
equal-mass bins), NLL and Brier of its probabilities before and after temperature scaling, a
reliability diagram, and the churn / JS divergence between the probes of teacher and student
and, with several checkpoints, between runs (e.g. seeds). ``classifier`` (supervised and
pseudo_label runs only): the same measures of each role's own classifier, no probe; with
``--recompute-bn N`` (default: the run's ema.recompute_bn_batches) also as ``<role>+bn``, with
BatchNorm statistics recomputed as the trainer does. Prints a table and writes JSON
(default ``<run>/eval/<checkpoint>-<protocol>.json``). Features are cached under
``<run>/eval/features/``. Bad input is a one-line error with exit code 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ssl_ema.config import ConfigError
from ssl_ema.eval.context import EVAL_BATCH
from ssl_ema.eval.protocols import ProbeResult, cache_key, check_protocol

# Protocols that give test probabilities (calibration, consistency, reliability diagram), with
# what the diagram's curves are.
WITH_PROBS = {"linear": "linear probes", "classifier": "own classifiers"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="run directories or checkpoint folders")
    parser.add_argument("--protocol", default="knn",
                        help="knn | linear | classifier (default knn)")
    parser.add_argument("--roles", nargs="+", default=["teacher", "student"],
                        help="teacher, student, ema_<momentum>; classifier protocol also "
                             "best_ema (the run's EMA early-stopping choice) (default: teacher "
                             "student)")
    parser.add_argument("--k", type=int, help="kNN neighbours (default: the run's eval.knn_k)")
    parser.add_argument("--temperature", type=float,
                        help="kNN temperature (default: the run's eval.knn_temperature)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides that do not touch the weights, e.g. data.root=...")
    parser.add_argument("--recompute-bn", type=int, metavar="BATCHES",
                        help="classifier: also score each role with BatchNorm statistics "
                             f"recomputed on this many training batches of {EVAL_BATCH} "
                             "(default: the run's ema.recompute_bn_batches; 0: own statistics "
                             "only)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--no-cache", action="store_true", help="recompute features")
    return parser.parse_args(argv)


def evaluate_checkpoint(path: str, args: argparse.Namespace, device: torch.device
                        ) -> dict[str, ProbeResult]:
    from ssl_ema.engine.loaders import build_run_data
    from ssl_ema.eval.protocols import embed, run_protocol
    from ssl_ema.eval.trained import load_run

    run = load_run(path, args.set)
    if args.protocol == "classifier":
        from ssl_ema.eval.own_classifier import classifier_protocol

        nets = run.classifiers(args.roles)  # unknown role: error before any forward pass
        n_bn = args.recompute_bn if args.recompute_bn is not None else \
            run.cfg.ema.recompute_bn_batches
        return classifier_protocol(nets, build_run_data(run.cfg), device, n_bn,
                                   run.cfg.data.num_workers)
    backbones = run.backbones(args.roles)  # unknown role: error before any forward pass
    data = build_run_data(run.cfg)
    k = args.k if args.k is not None else run.cfg.eval.knn_k
    t = args.temperature if args.temperature is not None else run.cfg.eval.knn_temperature
    key = cache_key(run.cfg.data, run.cfg.run.seed)
    out = {}
    for role, backbone in backbones.items():
        prefix = None if args.no_cache else \
            run.run_dir / "eval" / "features" / f"{run.checkpoint.name}-{role}-{key}"
        feats = embed(backbone.to(device), data.train_eval, data.test_eval, data.num_classes,
                      prefix, num_workers=run.cfg.data.num_workers)
        out[role] = run_protocol(args.protocol, feats, k, t)
    return out


def probs(r: ProbeResult) -> torch.Tensor:
    if r.test_probs is None:
        raise ValueError("this protocol gives no probabilities; use --protocol linear")
    return r.test_probs


def consistency(results: dict[str, dict[str, ProbeResult]]) -> dict[str, Any]:
    """Churn and JS divergence: teacher vs student in each run, and each role across runs."""
    from ssl_ema.eval.consistency import pairwise_consistency

    out: dict[str, Any] = {}
    for ckpt, roles in results.items():
        if len(roles) > 1:
            out[f"roles in {ckpt}"] = pairwise_consistency({r: probs(p) for r, p in roles.items()})
    labels = [next(iter(roles.values())).test_labels for roles in results.values()]
    same_inputs = all(y is not None and torch.equal(y, labels[0]) for y in labels)  # type: ignore[arg-type]
    if len(results) > 1 and same_inputs:  # runs on other test data: nothing to compare
        for role in next(iter(results.values())):
            out[f"{role} across runs"] = pairwise_consistency(
                {c: probs(roles[role]) for c, roles in results.items()})
    return out


def table(protocol: str, results: dict[str, dict[str, ProbeResult]],
          agreement: dict[str, Any]) -> str:
    cols = ["accuracy"] + (["ece_15", "ece_100", "nll", "brier", "ece_15_ts", "nll_ts",
                            "temperature"] if protocol in WITH_PROBS else [])
    lines = [f"{protocol} protocol, test split:", "  " + f"{'checkpoint / role':<46}"
             + "".join(f"{c:>12}" for c in cols)]
    for ckpt, roles in results.items():
        for role, r in roles.items():
            name = f"{ckpt} / {role}"[-46:]
            lines.append(f"  {name:<46}" + "".join(  # no validation split: no temperature
                f"{r.metrics[c]:>12.4f}" if c in r.metrics else f"{'-':>12}" for c in cols))
    for what, pairs in agreement.items():
        for pair, v in pairs.items():
            lines.append(f"  {what}: {pair}: churn {v['churn']:.4f}, "
                         f"JS divergence {v['js_divergence']:.4f} nats")
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, results: dict[str, dict[str, ProbeResult]],
                  agreement: dict[str, Any]) -> Path:
    from ssl_ema.eval.trained import resolve_checkpoint

    run_dir, ckpt = resolve_checkpoint(args.checkpoints[0])
    out = args.out or run_dir / "eval" / f"{ckpt.name}-{args.protocol}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"protocol": args.protocol, "roles": args.roles,
           "results": {c: {r: p.metrics for r, p in roles.items()} for c, roles in results.items()},
           "consistency": agreement}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.protocol in WITH_PROBS:
        from ssl_ema.eval.calibration import reliability_diagram

        several = len(results) > 1  # curves named "#<position on the command line> <role>"
        curves = {(f"#{i + 1} {r}" if several else r): probs(p)
                  for i, roles in enumerate(results.values()) for r, p in roles.items()}
        labels = next(iter(next(iter(results.values())).values())).test_labels
        assert labels is not None  # the linear protocol returns them with its probabilities
        reliability_diagram(curves, labels, out.with_name(f"{out.stem}-reliability.png"),
                            title=f"{WITH_PROBS[args.protocol]}, 15 equal-mass bins")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_protocol(args.protocol, extra=("classifier",))
        from ssl_ema.eval.own_classifier import require_classifier
        from ssl_ema.eval.trained import resolve_checkpoint

        for path in args.checkpoints:  # every path checked before any work
            run_dir, _ = resolve_checkpoint(path)
            if args.protocol == "classifier":
                require_classifier(run_dir)
        if args.recompute_bn is not None and args.recompute_bn < 0:
            raise ConfigError(f"--recompute-bn: must be >= 0, got {args.recompute_bn}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results = {p: evaluate_checkpoint(p, args, device) for p in args.checkpoints}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    agreement = consistency(results) if args.protocol in WITH_PROBS else {}
    print(table(args.protocol, results, agreement))
    print(f"wrote {write_outputs(args, results, agreement)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
