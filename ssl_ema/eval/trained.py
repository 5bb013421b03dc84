"""The models of a finished (or interrupted) run, loaded from one of its checkpoints.

A checkpoint is an Accelerate folder (``engine/checkpoint.py``) whose ``model.safetensors`` holds
the method's whole state dict (``student.*``, ``teacher.*``, ``ema_copies.<i>.*``); the run's
resolved ``config.yaml`` two levels up says how to rebuild the method. We rebuild it and load the
file strictly, through safetensors (no unpickling), so a checkpoint that does not match the code
is an error, never a silently half-loaded model.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ssl_ema.config import Config, ConfigError, load_config
from ssl_ema.eval.context import roles as run_roles
from ssl_ema.methods import TeacherStudentMethod, build_method
from ssl_ema.models.backbones import backbone_from_config
from ssl_ema.run_files import given_objects, is_checkpoint_path, newest_intact, verified

MODEL_FILE = "model.safetensors"
BEST_EMA_FILE = "best_ema.safetensors"  # eval/early_stopping.py


@dataclass
class TrainedRun:
    """A run's config and the method restored from one checkpoint."""

    cfg: Config
    run_dir: Path
    checkpoint: Path
    method: TeacherStudentMethod
    in_chans: int

    def backbones(self, roles: Sequence[str]) -> dict[str, nn.Module]:
        """Backbones by role: ``teacher``, ``student``, ``ema_<momentum>`` (extra momenta)."""
        held = run_roles(self.method, self.cfg.ema.extra_momenta)
        available = {role: modules["backbone"] for role, modules in held.items()}
        return _pick(available, roles)

    def classifiers(self, roles: Sequence[str]) -> dict[str, nn.Module]:
        """Backbone + the run's own classifier by role (supervised and pseudo_label runs).

        Besides the checkpoint's roles, ``best_ema`` is the run's EMA early-stopping choice
        (``best_ema.safetensors``, with the BatchNorm statistics it was chosen with), whatever
        the checkpoint: the model the paper reports under noisy labels.
        """
        method = self.method
        available: dict[str, nn.Module] = dict(run_roles(method, self.cfg.ema.extra_momenta))
        if "classifier" not in method.student:
            raise no_classifier(self.run_dir, self.cfg.method.name)
        best = self.run_dir / BEST_EMA_FILE
        if "best_ema" in roles and best.is_file():  # loaded only when asked for
            available["best_ema"] = deepcopy(method.teacher)
            available["best_ema"].load_state_dict(load_file(str(best)), strict=True)
        return {r: nn.Sequential(d["backbone"], d["classifier"])  # type: ignore[index]
                for r, d in _pick(available, roles).items()}


def no_classifier(run_dir: Path, method: str) -> ConfigError:
    return ConfigError(f"'{run_dir}' is a {method} run: it has no classifier to evaluate; use "
                       "--protocol knn or --protocol linear")


def _pick(available: dict[str, nn.Module], roles: Sequence[str]) -> dict[str, nn.Module]:
    unknown = [r for r in roles if r not in available]
    if unknown:
        raise ConfigError(f"role '{unknown[0]}' is not in this run; valid: "
                          f"{', '.join(available)}")
    return {r: available[r] for r in roles}


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) from a run directory (its newest intact checkpoint, with a
    warning line for each damaged newer one, as ``--resume`` picks) or a checkpoint (checked
    against its manifest)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint '{path}' does not exist; pass a run directory written by "
                          "tools/train.py or one of its checkpoints/step_* folders")
    if is_checkpoint_path(path):
        run_dir, ckpt = path.parent.parent, verified(path)
    else:
        run_dir, ckpt = path, newest_intact(path)
    for needed in (run_dir / "config.yaml", ckpt / MODEL_FILE):
        if not needed.is_file():
            raise ConfigError(f"'{needed}' is missing; the run directory is incomplete "
                              "(pass a run written by tools/train.py)")
    return run_dir, ckpt


def _input_channels(cfg: Config, state: dict) -> int:
    """Channels of the first convolution/patch embedding, read off the saved weights."""
    probe = backbone_from_config(cfg, in_chans=3)
    for name, p in probe.named_parameters():
        if p.dim() == 4:
            return int(state[f"student.backbone.{name}"].shape[1])
    return 3


def load_run(path: str | Path, overrides: Sequence[str] = ()) -> TrainedRun:
    """Rebuild the method of the run at ``path`` and load a checkpoint into it (strict).

    ``overrides`` (``key.sub=value``) may change what does not touch the weights, e.g.
    ``data.root`` when the data moved, or ``data.eval_subset``.
    """
    run_dir, ckpt = resolve_checkpoint(path)
    backbone = given_objects(run_dir).get("backbone")
    if backbone:
        raise ConfigError(f"'{run_dir}' trained a backbone given from Python ({backbone}); its "
                          "config cannot rebuild it: load the checkpoint into your module "
                          "(docs/PYTHON_API.md, 'The teacher later')")
    cfg = load_config(run_dir / "config.yaml", overrides)
    # The checkpoint holds every weight: a fine-tuning run's model.init_from is not re-read.
    cfg = replace(cfg, model=replace(cfg.model, init_from=""))
    state = load_file(str(ckpt / MODEL_FILE))
    in_chans = _input_channels(cfg, state)
    classifier = state.get("student.classifier.weight")  # classification methods
    method = build_method(cfg, in_chans, 0 if classifier is None else int(classifier.shape[0]))
    method.load_state_dict(state, strict=True)
    method.eval().requires_grad_(False)
    return TrainedRun(cfg, run_dir, ckpt, method, in_chans)
