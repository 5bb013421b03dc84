#!/usr/bin/env python
"""Export the teacher (or another role's) backbone of a run as a safetensors state dict.

    python tools/export.py runs/quickstart/20261123-120000 [--role teacher] [--out FILE]

Load it with ``ssl_ema.models.export.load_backbone(FILE)`` (every backbone, CIFAR stem
included) or, for a plain timm architecture (the file's metadata says ``timm_loadable``), with
``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE), **KWARGS)``;
the tool prints that call. Default output: ``<run>/export/<checkpoint>-<role>.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_ema.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory or checkpoints/step_* folder")
    parser.add_argument("--role", default="teacher", help="teacher | student | ema_<momentum>")
    parser.add_argument("--out", type=Path, help="safetensors file to write")
    args = parser.parse_args(argv)
    try:
        from ssl_ema.eval.trained import load_run
        from ssl_ema.models.export import export_run_backbone

        run = load_run(args.checkpoint)
        backbone = run.backbones([args.role])[args.role]
        out = args.out or run.run_dir / "export" / f"{run.checkpoint.name}-{args.role}.safetensors"
        lines = export_run_backbone(backbone, out, run.cfg, run.in_chans,
                                    f"{run.checkpoint}:{args.role}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
