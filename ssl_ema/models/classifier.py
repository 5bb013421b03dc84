"""A timm backbone with a linear classifier, optionally started from saved backbone weights.

``model.init_from`` loads a state dict (.safetensors, or a torch file read with
``weights_only=True``) into the backbone, strictly: a missing or unexpected key is an error, so a
fine-tuning run cannot silently start from random weights. ``model.init_prefix`` selects and
strips a key prefix, e.g. ``teacher.backbone.`` in a checkpoint's ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.models.backbones import backbone_from_config


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of ``path`` whose names start with ``prefix``, with the prefix removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ConfigError(f"model.init_prefix: no tensor of '{path}' starts with '{prefix}'; "
                          f"keys look like '{next(iter(state), '')}'")
    return out


def load_backbone(backbone: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Strictly load the backbone weights saved at ``path`` (under ``prefix``)."""
    try:
        backbone.load_state_dict(read_state_dict(path, prefix), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ConfigError(f"model.init_from: '{path}' does not fit model.backbone ({first}); "
                          "check model.backbone, model.cifar_stem and model.init_prefix") from e


def classifier_modules(cfg: Config, in_chans: int, num_classes: int) -> dict[str, nn.Module]:
    """``{"backbone": timm model without head, "classifier": nn.Linear}``."""
    backbone = backbone_from_config(cfg, in_chans)
    if cfg.model.init_from:
        load_backbone(backbone, cfg.model.init_from, cfg.model.init_prefix)
    return {"backbone": backbone, "classifier": nn.Linear(backbone.num_features, num_classes)}
