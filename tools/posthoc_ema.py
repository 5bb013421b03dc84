#!/usr/bin/env python
"""Choose the EMA length after training: reconstruct post-hoc EMAs and score them.

    python tools/posthoc_ema.py RUN --sigma-rel 0.02 0.05 0.1 0.2
    python tools/posthoc_ema.py RUN --sigma-rel 0.05 0.1 --up-to 200000 --export 0.1
    python tools/posthoc_ema.py --train recipes/supervised_ema_digits.yaml \
        --set ema.posthoc.sigma_rels=[0.05,0.1] --sigma-rel 0.02 0.05 0.1 --out sweep.json

RUN is a run trained with ``ema.posthoc.sigma_rels`` (its snapshots in ``RUN/posthoc_ema/``).
Each ``--sigma-rel`` is reconstructed from all snapshots (or those up to ``--up-to`` samples
seen) as the least-squares combination of their profiles (Karras et al. 2024, Sec. 3) and scored
with the run's own protocol beside its tracked models (teacher, student, EMA copies) and the
fair floor: kNN for self-supervised runs, the own classifier's accuracy, ECE and NLL for
supervised and pseudo-labelling runs, each with its own BatchNorm statistics and with them
recomputed (``+bn``; ``--recompute-bn`` batches of 256, default the run's
ema.recompute_bn_batches, else 8). Prints a table, writes JSON (default
``RUN/eval/posthoc_ema.json``) and a plot of accuracy against sigma_rel beside it;
``--export SIGMA`` writes that reconstruction's backbone (BatchNorm recomputed) as
``tools/export.py`` does. ``--train RECIPE`` first trains RECIPE (with ``--set`` overrides) into
RUN (default: ``train/`` beside the JSON), or resumes or reuses the run there: one command for
a reproduction study. Bad input is a one-line error with exit code 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_BN_BATCHES = 8  # when the run recomputed none: 2,048 training images


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path,
                   help="run directory (with --train: the folder to train into)")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True,
                   help="relative EMA widths to reconstruct, each in (0, 0.2887]")
    p.add_argument("--up-to", type=int, metavar="SAMPLES",
                   help="use the snapshots up to this many samples seen (default: all)")
    p.add_argument("--recompute-bn", type=int, metavar="BATCHES",
                   help="batches of 256 training images for BatchNorm recomputation")
    p.add_argument("--export", type=float, metavar="SIGMA",
                   help="write this sigma_rel's backbone (BatchNorm recomputed)")
    p.add_argument("--out", "--json", dest="out", type=Path, help="JSON file to write")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--train", metavar="RECIPE", help="train this recipe first (into RUN)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="with --train: its overrides; else overrides that do not touch the "
                        "weights, e.g. data.root=...")
    return p


def resolve(argv: list[str]) -> dict[str, Any]:
    """The arguments that decide the result (a reproduction study's identity): with --train
    the recipe's resolved config, so a changed recipe or default trains again."""
    args = parser().parse_args(argv)
    out: dict[str, Any] = {"sigma_rel": args.sigma_rel, "up_to": args.up_to,
                           "recompute_bn": args.recompute_bn, "export": args.export}
    if args.train:
        from ssl_ema.config import load_config, to_dict

        out["train"] = to_dict(load_config(args.train, args.set))
    else:
        out.update(run=str(args.run), set=args.set)
    return out


def check_sigmas(args: argparse.Namespace) -> None:
    from ssl_ema.config import ConfigError
    from ssl_ema.posthoc.profiles import check_sigma_rel

    for flag, values in (("--sigma-rel", args.sigma_rel),
                         ("--export", [] if args.export is None else [args.export])):
        for value in values:
            try:
                check_sigma_rel(value)
            except ValueError as e:
                raise ConfigError(f"{flag}: {e}") from None
    if args.recompute_bn is not None and args.recompute_bn < 0:
        raise ConfigError(f"--recompute-bn: must be >= 0, got {args.recompute_bn}")


def trained_run(args: argparse.Namespace) -> Path:
    """--train: the run under RUN, trained (or resumed) to its end; else RUN itself."""
    from ssl_ema.config import ConfigError, load_config

    if not args.train:
        if args.run is None:
            raise ConfigError("give RUN, a run directory trained with ema.posthoc.sigma_rels, "
                              "or --train RECIPE")
        return args.run
    cfg = load_config(args.train, args.set)  # a bad recipe: one line, before any training
    if not cfg.ema.posthoc.sigma_rels:
        raise ConfigError(f"--train {args.train}: ema.posthoc.sigma_rels is empty; add "
                          "--set 'ema.posthoc.sigma_rels=[0.05,0.1]'")
    from ssl_ema.engine.launch import train
    from ssl_ema.engine.run import RESUMABLE_CHANGES, changed_keys

    home = args.run or (args.out.parent / "train" if args.out else Path("posthoc_train"))
    name = cfg.run.name or Path(args.train).stem
    settings = [f"run.output_dir={home}", f"run.name={name}"]
    where = {"run.output_dir", "run.name"}  # set here, not by the recipe
    same = [p.parent for p in sorted((home / name).glob("*/config.yaml"))
            if not changed_keys(p.parent, cfg, RESUMABLE_CHANGES | where)]
    if same and (same[-1] / "results.json").is_file():
        return same[-1]  # this recipe's run, finished: reused
    code = train(None, [], str(same[-1])) if same and list((same[-1] / "checkpoints").glob(
        "step_*")) else train(args.train, [*args.set, *settings], None)
    if code != 0:
        raise SystemExit(code)
    return sorted((home / name).glob("*/results.json"), key=lambda p: p.stat().st_mtime)[-1].parent


def plans_for(run_dir: Path, args: argparse.Namespace) -> list:
    """The reconstruction of each --sigma-rel; ConfigError (one line) on what is missing."""
    from ssl_ema.config import ConfigError
    from ssl_ema.engine.posthoc import FOLDER
    from ssl_ema.posthoc import list_snapshots, solve_reconstruction

    try:
        snapshots = list_snapshots(run_dir / FOLDER)
        if not snapshots:
            raise ConfigError(f"no post-hoc EMA snapshots in {run_dir / FOLDER}: train with "
                              "ema.posthoc.sigma_rels=[0.05,0.1] (docs/EVALUATION.md)")
        return [solve_reconstruction(snapshots, s, args.up_to) for s in args.sigma_rel]
    except ValueError as e:
        raise ConfigError(str(e)) from None


def export(run: Any, plans: list, args: argparse.Namespace, bn_batches: int) -> list[str]:
    """--export: the chosen reconstruction's backbone, BatchNorm recomputed as it was scored."""
    from torch.utils.data import DataLoader

    from ssl_ema.ema import recompute_batchnorm
    from ssl_ema.engine.loaders import build_run_data
    from ssl_ema.eval.own_classifier import BN_BATCH
    from ssl_ema.eval.posthoc import reconstructed_model, role_of
    from ssl_ema.models.export import export_run_backbone
    from ssl_ema.posthoc import solve_reconstruction

    plan = next((p for p in plans if p.sigma_rel == args.export), None) or \
        solve_reconstruction(plans[0].snapshots, args.export)
    backbone = reconstructed_model(run, plan)["backbone"]
    bank = DataLoader(build_run_data(run.cfg).train_eval, batch_size=BN_BATCH)
    recompute_batchnorm(backbone, bank, bn_batches)
    out = run.run_dir / "export" / f"{role_of(args.export)}.safetensors"
    return export_run_backbone(backbone, out, run.cfg, run.in_chans,
                               f"{run.run_dir}:{role_of(args.export)}+bn")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ssl_ema.config import ConfigError

    try:
        check_sigmas(args)
        run_dir = trained_run(args)
        from ssl_ema.eval.posthoc import (
            document,
            plot_sweep,
            reconstructed_model,
            role_of,
            score_models,
            table,
        )
        from ssl_ema.eval.trained import load_run

        plans = plans_for(run_dir, args)  # every request checked before the model is loaded
        run = load_run(run_dir, [] if args.train else args.set)
        bn = args.recompute_bn if args.recompute_bn is not None else \
            run.cfg.ema.recompute_bn_batches or DEFAULT_BN_BATCHES
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        posthoc = {role_of(p.sigma_rel): reconstructed_model(run, p) for p in plans}
        scored = score_models(run, posthoc, device, bn)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{run_dir}: {len(plans[0].snapshots)} snapshots up to {plans[0].samples_seen} "
          f"samples seen; {scored.protocol} protocol, test split, BatchNorm recomputed on {bn} "
          "batches (+bn)")
    print(table(scored, plans))
    out = args.out or run.run_dir / "eval" / "posthoc_ema.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document(scored, plans, run, bn), indent=1) + "\n")
    print(f"wrote {out}")
    if not args.no_plot:
        title = f"{'/'.join(run.run_dir.parts[-2:])}: post-hoc EMA, BatchNorm recomputed"
        plot_sweep(scored, [p.sigma_rel for p in plans], out.with_suffix(".png"), title)
        print(f"wrote {out.with_suffix('.png')}")
    if args.export is not None:
        print("\n".join(export(run, plans, args, bn)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
