"""Export a trained backbone as a plain safetensors state dict that timm (or ssl_ema) loads.

The file holds the backbone's state dict with timm's own key names (no ``teacher.backbone.``
prefix), so ``model.init_from`` and any timm user can read it. Its safetensors metadata records
how to rebuild the architecture:

- ``timm_model`` and ``timm_kwargs`` (JSON): for a backbone timm builds as is,
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)``
  loads it exactly (timm reads local safetensors files and loads them strictly; no internet).
- ``build_kwargs`` (JSON): the arguments of ``ssl_ema.models.backbones.build_backbone``. Our CIFAR
  stem (3x3 stride-1 first convolution, no max-pool) is not a timm option, so plain timm cannot
  build that architecture: ``load_backbone(path)`` builds it and loads the file strictly, and
  works for every export. ``timm_loadable`` says which case a file is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.models.backbones import build_backbone, create_timm_backbone

FORMAT = "ssl_ema.backbone/1"


def export_backbone(backbone: nn.Module, path: Path, *, name: str, in_chans: int,
                    image_size: int, cifar_stem: bool, patch_size: int = 0,
                    stem_activation: bool = True, source: str = "") -> dict[str, str]:
    """Write ``backbone``'s state dict to ``path`` (safetensors) with its build recipe.

    The recipe is checked before anything is written: a fresh model built from it must take the
    state dict strictly, so a file that loads later is the same architecture.
    Returns the metadata written.
    """
    build = {"name": name, "in_chans": in_chans, "image_size": image_size,
             "cifar_stem": cifar_stem, "patch_size": patch_size}
    if not stem_activation:  # not in the state dict (a ReLU has no weights): record it
        build["stem_activation"] = False
    _, timm_kwargs = create_timm_backbone(name, in_chans=in_chans, image_size=image_size,
                                          patch_size=patch_size)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    try:
        build_backbone(**build).load_state_dict(state, strict=True)  # type: ignore[arg-type]
    except RuntimeError as e:
        raise ConfigError(f"the backbone does not match its recorded recipe {build}: "
                          f"{str(e).splitlines()[0]}") from e
    loadable = not cifar_stem and stem_activation  # timm.create_model(name) rebuilds it as is
    meta = {"format": FORMAT, "timm_model": name, "timm_kwargs": json.dumps(timm_kwargs),
            "build_kwargs": json.dumps(build), "timm_loadable": json.dumps(loadable),
            "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The recipe of an exported backbone (JSON fields decoded)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone file '{path}' does not exist; write one with "
                          "tools/export.py")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ConfigError(f"'{path}' is not an ssl_ema backbone export (format "
                          f"{meta.get('format')!r}); write one with tools/export.py")
    return {k: json.loads(v) if k.endswith(("_kwargs", "_loadable")) else v
            for k, v in meta.items()}


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exported architecture (CIFAR stem included) and load the weights strictly."""
    meta = read_metadata(path)
    model = build_backbone(**meta["build_kwargs"])
    model.load_state_dict(load_file(str(path), device=str(map_location)), strict=True)
    return model.to(map_location)


def export_run_backbone(backbone: nn.Module, out: Path, cfg: Config, in_chans: int,
                        source: str) -> list[str]:
    """`export_backbone` with a run's model settings; the lines saying how to load the file."""
    m = cfg.model
    meta = export_backbone(backbone, out, name=m.backbone, in_chans=in_chans,
                           image_size=cfg.data.image_size, cifar_stem=m.cifar_stem,
                           patch_size=m.patch_size, stem_activation=m.stem_activation,
                           source=source)
    lines = [f"wrote {out}", f"  ssl_ema:  from ssl_ema.models.export import load_backbone; "
                             f"load_backbone('{out}')"]
    if json.loads(meta["timm_loadable"]):
        kwargs = ", ".join(f"{k}={v!r}" for k, v in json.loads(meta["timm_kwargs"]).items())
        lines.append(f"  timm:     timm.create_model('{m.backbone}', pretrained=True, "
                     f"pretrained_cfg_overlay=dict(file='{out}'), {kwargs})")
    else:
        lines.append("  timm:     not loadable by plain timm.create_model (CIFAR stem); "
                     "use load_backbone")
    return lines
