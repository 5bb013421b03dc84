"""Training from Python (a notebook, a script): `train` does what ``tools/train.py`` does, with
a recipe or `Config`, and optionally the caller's own data sets and backbone module in place of
``data.dataset`` and ``model.backbone``. The run is the same: its directory under
``run.output_dir``, header, metrics.jsonl, checkpoints, the EMA teachers and the EMA Scaling
Rule, the evaluation of teacher and student, ``--resume``-style continuation (``resume=``).
docs/PYTHON_API.md shows it end to end.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from torch.utils.data import Dataset

from ssl_ema.config import Config, ConfigError, config_from, dump_yaml, load_config
from ssl_ema.data.custom import given_data
from ssl_ema.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from ssl_ema.engine.launch import locked_start
from ssl_ema.engine.run import (
    check_same_processes,
    check_same_run,
    new_run_dir,
    resume_target,
    saved_config,
)
from ssl_ema.engine.trainer import Trainer
from ssl_ema.methods.registry import method_data
from ssl_ema.models.custom import BackboneSource, describe

ConfigSource = Config | str | Path | Mapping[str, Any] | None


@dataclass
class TrainedRun:
    """What `train` returns: the run directory, the final metrics (as in results.json) and the
    trainer, whose unwrapped ``model`` holds the trained student, teacher and EMA copies."""

    run_dir: Path
    results: dict[str, float]
    trainer: Trainer

    @property
    def teacher(self) -> nn.Module:
        """The teacher's backbone (the EMA of the student's)."""
        return self.trainer.model.teacher_backbone

    @property
    def student(self) -> nn.Module:
        return self.trainer.model.student_backbone


def resolve_config(config: ConfigSource, overrides: Sequence[str] = ()) -> Config:
    """A `Config` from a recipe path, a nested mapping (as a recipe's YAML), a `Config` or None
    (the defaults), with ``a.b=c`` overrides applied; validated (`ConfigError`)."""
    if isinstance(config, Config):
        if not overrides:
            return config
        config = yaml.safe_load(dump_yaml(config))
    if config is None or isinstance(config, str | Path):
        return load_config(config, overrides)
    return config_from(config, overrides)  # type: ignore[arg-type]


def train(config: ConfigSource = None, overrides: Sequence[str] = (), *,
          train_set: Dataset | None = None, test_set: Dataset | None = None,
          num_classes: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
          std: Sequence[float] = IMAGENET_STD, backbone: BackboneSource | str | None = None,
          num_features: int | None = None, resume: str | Path | None = None) -> TrainedRun:
    """Train and evaluate one run; see the module docstring.

    ``train_set`` / ``test_set``: ``(image, label)`` data sets (`ssl_ema.data.custom`) used
    instead of ``data.dataset``; labels feed the kNN evaluation (and the classification
    methods); ``num_classes`` defaults to ``len(train_set.classes)`` or the largest label + 1;
    ``mean`` / ``std`` normalise the views. ``backbone``: an ``nn.Module`` (or a function
    building one) mapping images to ``(batch, num_features)`` features, instead of
    ``model.backbone``; ``num_features`` where the module has no such attribute; a string is
    a timm name, the same as ``model.backbone=<name>``.
    ``resume``: a run directory (or one of its checkpoints) to continue, with the same config
    and objects. Raises `ConfigError` (one line) on bad input, before any work; a stop signal
    raises `ssl_ema.engine.stop.Stopped` after checkpointing."""
    if (train_set is None) != (test_set is None):
        raise ConfigError("give both train_set and test_set (the held-out kNN queries), or "
                          "neither to train on data.dataset")
    if train_set is not None:  # recorded in config.yaml; frees the RGB-only keys from digits
        overrides = [*overrides, "data.dataset=given"]
    if isinstance(backbone, str):  # a timm name: the recipe's backbone, built as tools/train.py
        if num_features is not None:
            raise ConfigError(f"num_features={num_features} goes with a backbone module; the "
                              f"timm model '{backbone}' has its own: drop num_features")
        overrides, backbone = [*overrides, f"model.backbone={backbone}"], None
    if backbone is not None:  # recorded in config.yaml; header.json's "given" names the module
        overrides = [*overrides, "model.backbone=given"]
    cfg, run_dir, checkpoint = _run_target(config, overrides, resume)
    data = None
    if train_set is not None and test_set is not None:
        data = given_data(cfg, method_data(cfg), train_set, test_set, num_classes, mean, std)
    given = {**({} if train_set is None else {"train_set": describe(train_set),
                                              "test_set": describe(test_set)}),
             **({} if backbone is None else {"backbone": describe(backbone)})}
    trainer, lock = locked_start(run_dir, lambda folder: Trainer(
        cfg, folder, checkpoint, data=data, backbone=backbone, num_features=num_features,
        given=given), new=resume is None)
    try:
        try:
            results = trainer.fit()
        finally:
            trainer.accelerator.end_training()  # the trackers' last writes
    finally:
        lock.release()
    gc.collect()  # the process group's threads, as tools/train.py (engine/launch.py)
    return TrainedRun(trainer.run_dir, results, trainer)


def _run_target(config: ConfigSource, overrides: Sequence[str],
                resume: str | Path | None) -> tuple[Config, Path, Path | None]:
    """(config, run directory, checkpoint to load): a new run, or ``resume``'s run, whose
    saved config.yaml is the config when none is given."""
    if resume is None:
        cfg = resolve_config(config, overrides)
        return cfg, new_run_dir(cfg), None
    run_dir, checkpoint = resume_target(str(resume))
    cfg = resolve_config(saved_config(run_dir) if config is None else config, overrides)
    check_same_run(run_dir, cfg)
    check_same_processes(checkpoint, cfg)
    return cfg, run_dir, checkpoint
