"""Typed run configuration: YAML recipe + ``a.b=c`` overrides -> frozen dataclasses.

A recipe holds only the differences from the defaults below. Every error (unknown key, wrong
type, unknown choice) is a :class:`ConfigError` whose one-line message names the key and the
valid choices, raised before any model or data is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message is one line naming the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    name: str = ""  # default: the recipe's file stem
    output_dir: str = "runs"
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits | cifar10 | cifar100 | imagefolder
    root: str = "data"  # CIFAR: torchvision layout; imagefolder: root/{train,test}/<class>/*
    download: bool = True  # CIFAR only; offline -> clear error asking for data.root
    image_size: int = 32  # side of the training views
    num_workers: int = 4
    eval_subset: int = 0  # >0: use only this many train/test images for kNN (fast checks)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    cifar_stem: bool = True  # ResNets: 3x3 stride-1 first conv, no max-pool (small images)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "byol"
    projection_hidden_dim: int = 4096
    projection_dim: int = 256
    prediction_hidden_dim: int = 4096
    # Teacher momentum rho in teacher <- rho*teacher + (1-rho)*student, cosine from
    # momentum to momentum_end over training (BYOL, Grill et al. 2020, Sec. 3.2).
    momentum: float = 0.99
    momentum_end: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    name: str = "lars"  # sgd | lars | adamw
    lr: float = 0.2  # base learning rate at reference_batch
    reference_batch: int = 256  # lr is stated for this batch; scaled to the effective batch
    weight_decay: float = 1.5e-6
    momentum: float = 0.9  # SGD/LARS heavy-ball momentum (not an EMA)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 512  # effective batch = world size x per-device batch x accumulation
    grad_accumulation: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10  # optimizer steps
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke runs, benchmarks)


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    every_epochs: int = 10  # 0 = only before and after training


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Valid choices for string fields that name a registered component. Backbones are checked
# against timm's registry in `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("digits", "cifar10", "cifar100", "imagefolder"),
    "method.name": ("byol",),
    "optim.name": ("sgd", "lars", "adamw"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert int -> float and list -> tuple."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            valid = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{key}: invalid value {value!r}; valid: {valid}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a section of keys, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_nested(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=5", "data.dataset=cifar10"]`` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        _set_nested(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values."""
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML recipe (safe loader), apply overrides, validate. Raises ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' not found; pass the path of a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is not None and not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {kind}")
        values = loaded or {}
        values.setdefault("run", {})
        if isinstance(values["run"], dict):
            values["run"].setdefault("name", path.stem)
    values = _merge(values, parse_overrides(overrides))
    return from_dict(values)


def validate(cfg: Config) -> None:
    """Check choices and cross-field constraints that the types alone cannot express."""
    for dotted, valid in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in valid:
            raise ConfigError(f"{dotted}: unknown value '{value}'; valid: {', '.join(valid)}")
    import timm  # deferred: importing timm takes a second

    if not timm.is_model(cfg.model.backbone):
        close = timm.list_models(f"*{cfg.model.backbone.split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ConfigError(f"model.backbone: unknown timm model '{cfg.model.backbone}'{hint}")
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accumulation": cfg.train.grad_accumulation,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.log_every": cfg.train.log_every,
        "data.image_size": cfg.data.image_size,
        "optim.reference_batch": cfg.optim.reference_batch,
        "eval.knn_k": cfg.eval.knn_k,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in {"method.momentum": cfg.method.momentum,
                       "method.momentum_end": cfg.method.momentum_end}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: a momentum must lie in [0, 1], got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.optim.lr}")
    if cfg.eval.knn_temperature <= 0:
        raise ConfigError(f"eval.knn_temperature: must be positive, got {cfg.eval.knn_temperature}")
    if cfg.train.batch_size % cfg.train.grad_accumulation:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by "
            f"train.grad_accumulation {cfg.train.grad_accumulation}; pick a multiple"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
