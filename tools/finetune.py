#!/usr/bin/env python
"""Fine-tune an exported backbone end to end on a labelled data set, with its own recipe.

    python tools/export.py runs/quickstart/RUN                       # -> RUN/export/*.safetensors
    python tools/finetune.py RUN/export/step_00000330-teacher.safetensors \\
        recipes/finetune_digits.yaml [key.sub=value ...]

The recipe trains a classifier: ``method.name=supervised`` (a linear classifier on the backbone,
model EMAs, EMA early stopping on a validation split) or ``pseudo_label`` (few labels). The
architecture comes from the export's metadata (``model.backbone``, ``model.cifar_stem``,
``model.patch_size``) and the weights through ``model.init_from``, loaded strictly: a backbone
that does not fit the data (e.g. grey vs RGB) is a one-line error with exit code 2, as is a
self-supervised recipe. Everything else is `tools/train.py`: the run directory, checkpoints,
``--resume`` of the fine-tuning run itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_ema.config import ConfigError, load_config
from ssl_ema.engine.launch import train
from ssl_ema.engine.stop import exit_now
from ssl_ema.models.export import read_metadata


def backbone_overrides(export: Path) -> list[str]:
    """``model.*`` overrides that rebuild the exported architecture and load its weights."""
    build = read_metadata(export)["build_kwargs"]
    return [f"model.backbone={build['name']}",
            f"model.cifar_stem={str(bool(build.get('cifar_stem', False))).lower()}",
            f"model.patch_size={int(build.get('patch_size', 0))}",
            f"model.stem_activation={str(bool(build.get('stem_activation', True))).lower()}",
            f"model.init_from={export.resolve()}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", type=Path, help="a .safetensors file from tools/export.py")
    parser.add_argument("recipe", help="a supervised recipe, e.g. recipes/finetune_digits.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        overrides = [*args.overrides, *backbone_overrides(args.backbone)]
        load_config(args.recipe, overrides)  # a self-supervised recipe fails here: init_from
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return train(args.recipe, overrides)


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal: within the launcher's grace (engine/stop.py)
        exit_now(code)
    sys.exit(code)
