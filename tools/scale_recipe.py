#!/usr/bin/env python
"""Rescale a recipe to another batch size with the EMA Scaling Rule.

    python tools/scale_recipe.py recipes/byol_r18.yaml --batch-size 4096 [--out FILE]

The new recipe states every batch-size-dependent value at the new batch (it becomes
``scaling.reference_batch``): lr by the optimizer's rule, Adam betas/eps by the square-root rule,
every EMA momentum rho -> rho ** kappa (Busbridge et al. 2023), as the recipe's ``scaling.rule``
prescribes. Training either recipe at that batch gives the same hyperparameters; the endpoints of
a momentum schedule are rescaled, so its interior differs by O((1 - rho)^2) (noted in the header).
Without ``--out`` the recipe is printed; an existing ``--out`` file is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from ssl_ema.config import Config, ConfigError, from_dict, load_config
from ssl_ema.scaling import ema_kappa, kappa, scale_momentum, scale_optimizer


def rescaled_values(cfg: Config, batch: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Sections/keys to set for stating ``cfg`` at ``batch``, and one note per changed value."""
    k = kappa(batch, cfg.scaling.reference_batch)
    opt = scale_optimizer(cfg.optim.name, k, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps,
                          cfg.scaling.rule)
    e = ema_kappa(k, cfg.scaling.rule)
    momentum = scale_momentum(cfg.method.momentum, e, "method.momentum")
    momentum_end = scale_momentum(cfg.method.momentum_end, e, "method.momentum_end")
    extra = [scale_momentum(m, e, f"ema.extra_momenta[{i}]")
             for i, m in enumerate(cfg.ema.extra_momenta)]
    values: dict[str, dict[str, Any]] = {
        "optim": {"lr": opt.lr.value},
        "method": {"momentum": momentum.value, "momentum_end": momentum_end.value},
        "scaling": {"reference_batch": batch},
        "train": {"batch_size": batch},
    }
    if extra:
        values["ema"] = {"extra_momenta": [v.value for v in extra]}
    notes = [opt.lr.describe()]
    if opt.betas is not None and opt.eps is not None:
        values["optim"]["betas"] = [opt.betas[0].value, opt.betas[1].value]
        values["optim"]["eps"] = opt.eps.value
        notes += [v.describe() for v in (*opt.betas, opt.eps)]
    notes += [v.describe() for v in (momentum, momentum_end, *extra)]
    return values, notes


def scaled_recipe(recipe: Path, batch: int) -> str:
    """The text of ``recipe`` restated at ``batch`` (validated before and after)."""
    cfg = load_config(recipe)
    raw = yaml.safe_load(recipe.read_text()) or {}
    values, notes = rescaled_values(cfg, batch)
    for section, keys in values.items():
        raw.setdefault(section, {}).update(keys)
    k = kappa(batch, cfg.scaling.reference_batch)
    header = [
        f"# {recipe.name} restated at batch {batch} by tools/scale_recipe.py",
        f"# (kappa = {batch} / {cfg.scaling.reference_batch} = {k:g}, scaling.rule "
        f"{cfg.scaling.rule}; Busbridge et al. 2023):",
        *(f"#   {n}" for n in notes),
        "# A cosine momentum schedule is rescaled at its endpoints; in between it differs from",
        "# the per-step rescaling by O((1 - momentum)^2).",
    ]
    from_dict(raw)  # the new recipe passes the same validation as any other
    return "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="the new effective batch")
    parser.add_argument("--out", type=Path, help="write here (refuses to overwrite)")
    args = parser.parse_args(argv)
    try:
        if args.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
        if args.out is not None and args.out.exists():
            raise ConfigError(f"--out {args.out} exists; choose a new path (nothing overwritten)")
        text = scaled_recipe(args.recipe, args.batch_size)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
