"""Typed run configuration: YAML recipe + ``a.b=c`` overrides -> frozen dataclasses.

A recipe holds only the differences from the defaults below. Every error (unknown key, wrong
type, unknown choice) is a :class:`ConfigError` whose one-line message names the key and the
valid choices, raised before any model or data is built.
"""

from __future__ import annotations

import dataclasses
import math
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
    eval_subset: int = 0  # >0: use only this many train/val/test images to evaluate (fast checks)
    # imagefolder: files that are not readable images (checked at start-up, before any work;
    # ~6 s for CIFAR-10's 60k files): "fail" names the first one and stops; "skip" leaves them
    # out and reports how many; "trust" does not check (huge folders known to be clean).
    corrupt: Literal["fail", "skip", "trust"] = "fail"
    # "loader": DataLoader workers run lightly's transforms on the CPU (any data set).
    # "device": the data set is decoded once to uint8 on the accelerator and the views are made
    # there in batched ops (data/gpu_augment.py): 4.5x a lightly-style loader's images/s on
    # CIFAR-10 on an H100 (RGB only; docs/RESULTS.md).
    pipeline: Literal["loader", "device"] = "loader"
    # BYOL's view pair. byol: lightly's BYOLView1/2Transform (Grill et al. 2020, Tab. 6: blur
    # and solarisation differ between the views). simclr: lightly's SimCLRTransform, both views
    # alike (Chen et al. 2020, App. A: jitter brightness/contrast/saturation 0.8s, hue 0.2s at
    # strength s = jitter_strength, p 0.8; grey-scale 0.2; blur p 0.5, off <= 64 px; no
    # solarisation), as lightly's CIFAR-10 benchmarks train BYOL (s = 0.5, SimCLR App. B.9).
    views: Literal["byol", "simclr"] = "byol"
    jitter_strength: float = 0.5  # views=simclr only
    # Normalisation of every view: "dataset" (CIFAR's own statistics where known, else
    # ImageNet's) or "imagenet" (ImageNet's statistics everywhere, as lightly's benchmarks).
    normalize: Literal["dataset", "imagenet"] = "dataset"


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    cifar_stem: bool = True  # ResNets: 3x3 stride-1 first conv, no max-pool (small images)
    patch_size: int = 0  # ViTs: >0 overrides the model's patch size (e.g. 4 on 32 px images)
    # Layer initialisation. timm: timm's own (ResNets: Kaiming-normal fan-out convs, last BN of
    # each block zeroed). torch: PyTorch's layer defaults (Kaiming-uniform a=sqrt(5), BN 1/0), as
    # lightly's ResNetGenerator behind its CIFAR-10 benchmarks; see docs/RESULTS.md for what this
    # does to BYOL on CIFAR-10.
    init: Literal["timm", "torch"] = "timm"
    # ResNets: the ReLU after the stem's BatchNorm. lightly's CIFAR-10 benchmarks take the
    # children of ResNetGenerator, whose stem ReLU lives in ResNet.forward: false drops it.
    stem_activation: bool = True
    # supervised / pseudo_label: start the student (and so the teacher) backbone from this state
    # dict (.safetensors or torch file), keys under init_prefix (e.g. "teacher.backbone." for a
    # checkpoint's model.safetensors). Fine-tuning a pretrained teacher is the supervised recipe.
    init_from: str = ""
    init_prefix: str = ""


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
class DINOConfig:
    """DINO (Caron et al. 2021); defaults are the paper's ViT-S/16 ImageNet values."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    output_dim: int = 65536
    head_batch_norm: bool = False  # BN in the head's MLP (DINO's use_bn_in_head)
    norm_last_layer: bool = True  # weight-normalised last layer with fixed norm
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # linear warm-up from here to teacher_temp ...
    warmup_teacher_temp_epochs: float = 30.0  # ... over these epochs (of samples)
    # Centre EMA c <- m c + (1 - m) mean(teacher output), once per forward pass: an EMA, so
    # its momentum is scaled like the teacher's (per forward, batch / accumulation samples).
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0  # no gradient to the last layer early on
    local_views: int = 6  # multi-crop: 2 global views + this many local views
    local_size: int = 96  # side of the local views (global views: data.image_size)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    # Linear layers of the head's MLP before the weight-normalised last layer (the official
    # code's nlayers; lightly's CIFAR-10 benchmark uses 2) and their init: trunc_normal (std
    # 0.02, bias 0: official DINO, lightly's DINOProjectionHead) or torch (PyTorch's defaults,
    # which lightly's benchmark head keeps).
    head_layers: int = 3
    head_init: Literal["trunc_normal", "torch"] = "trunc_normal"
    # true: views of one resolution go through the networks in one pass (official DINO, so
    # BatchNorm sees them together); false: one pass per view, as lightly's benchmarks.
    batch_views: bool = True


@dataclass(frozen=True)
class OptimConfig:
    name: str = "lars"  # sgd | lars | adam | adamw
    lr: float = 0.2  # base learning rate at scaling.reference_batch
    weight_decay: float = 1.5e-6
    momentum: float = 0.9  # SGD/LARS heavy-ball momentum (not an EMA; not scaled)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW, at the reference batch
    eps: float = 1.0e-8  # Adam/AdamW, at the reference batch
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay_end: float | None = None  # cosine from weight_decay to this (DINO: 0.04 -> 0.4)
    clip_grad_norm: float = 0.0  # >0: clip the student's gradient norm (DINO: 3.0)
    nesterov: bool = False  # SGD only (FixMatch; Morales-Brotons et al. 2024)
    # false: biases and norm weights (1-D tensors) get no weight decay (BYOL App. J, SimCLR);
    # true: every parameter is decayed, as in lightly's CIFAR-10 benchmarks.
    decay_norm_bias: bool = False
    # true: lr (and weight decay) stay constant within an epoch and step along their cosine at
    # each epoch's start, as torch's CosineAnnealingLR(T_max=epochs) stepped once per epoch
    # (PyTorch Lightning's default interval; lightly's CIFAR-10 benchmarks). false: per step.
    schedule_per_epoch: bool = False


@dataclass(frozen=True)
class ScalingConfig:
    # Every batch-size-dependent value (lr, Adam betas/eps, every EMA momentum) is stated at this
    # batch and resolved for kappa = effective batch / reference_batch (ssl_ema/scaling.py).
    reference_batch: int = 256
    # ema: EMA Scaling Rule (momentum ** kappa) + optimizer rule (Busbridge et al. 2023);
    # optimizer: optimizer rule only (momenta unscaled: the common practice); none: nothing scaled.
    rule: Literal["ema", "optimizer", "none"] = "ema"
    # BatchNorm running statistics are an EMA too: momentum 0.1 at the reference batch -> scaled.
    batchnorm: bool = True


@dataclass(frozen=True)
class EMAConfig:
    # Momenta are per optimizer step at the reference batch; see ssl_ema/ema.py.
    period: int = 1  # update the teachers every T optimizer steps, with momentum ** T
    warmup: bool = False  # min(rho, (t+1)/(t+10)), t in reference steps (Morales-Brotons 2024)
    buffers: Literal["own", "copy", "average"] = "own"  # teacher BatchNorm statistics
    # Extra EMAs of the teacher modules at fixed momenta, tracked in parallel and evaluated
    # (the paper's 0.968..0.998 every 16 steps are 0.99797..0.99987 per step).
    extra_momenta: tuple[float, ...] = ()
    recompute_bn_batches: int = 0  # >0: recompute EMA copies' BatchNorm stats before evaluation
    # One compiled kernel for all teachers, reading the student once (ssl_ema/ema.py): for 2+
    # teachers (extra_momenta); needs torch.compile (Triton on GPU, a C++ compiler on CPU).
    fused: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 512  # effective batch = world size x per-device batch x accumulation
    # Progressive scaling (Busbridge et al. 2023, Alg. 1): [[epoch, batch], ...] switches the
    # effective batch at the start of that epoch; schedules follow samples seen, kappa is
    # recomputed, so the number of steps changes and the dynamics do not.
    batch_schedule: tuple[tuple[int, int], ...] = ()
    grad_accumulation: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    # Also by wall clock, so a hard kill or a lost node costs at most this much; 0 = off.
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 2
    log_every: int = 10  # optimizer steps
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke runs, benchmarks)
    # A NaN/inf loss: "fail" stops (naming the step and the last good checkpoint) before anything
    # is written; "skip" drops that optimizer step (no update, no EMA) and counts it.
    nonfinite: Literal["fail", "skip"] = "fail"
    # Several GPUs: BatchNorm statistics over the global batch (student and teachers).
    sync_batchnorm: bool = False
    channels_last: bool = False  # NHWC activations: tensor cores run convolutions ~2x faster
    # torch.compile the method (Accelerate's dynamo plugin) and the device views' colour ops;
    # the first steps then take a minute longer (Triton on GPU, a C++ compiler on CPU).
    compile: bool = False


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    every_epochs: int = 10  # 0 = only before and after training


@dataclass(frozen=True)
class LabelsConfig:
    """Which training labels the classification methods (supervised, pseudo_label) see."""

    # >0: a labelled subset of this many images per class, chosen with run.seed; the other
    # training images are the unlabelled set (pseudo_label). 400 = CIFAR-10 with 4,000 labels.
    per_class: int = 0
    # CIFAR-10N human labels (Wei et al. 2022) attached by original index: clean | aggre |
    # random1 | random2 | random3 | worse; read from noisy_file (CIFAR-10_human.pt).
    noisy: Literal["clean", "aggre", "random1", "random2", "random3", "worse"] = "clean"
    noisy_file: str = ""
    # Synthetic symmetric noise (data/synthetic_noise.py), any data set: with this probability
    # each training label becomes another class, drawn uniformly (seeded by run.seed); the test
    # labels stay clean. In [0, 1); not with labels.noisy (CIFAR-10N is already noisy).
    symmetric_noise: float = 0.0
    # >0: hold out this fraction of the training images, stratified and seeded, for choosing the
    # best EMA and epoch (EMA early stopping; Morales-Brotons et al. 2024 use 0.2).
    val_fraction: float = 0.0


@dataclass(frozen=True)
class SupervisedConfig:
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class PseudoLabelConfig:
    """FixMatch-style pseudo-labelling with an EMA teacher (Sohn et al. 2020; Busbridge et al.
    2023, Sec. 3.3); the defaults are FixMatch's CIFAR-10 values."""

    threshold: float = 0.95  # tau: keep pseudo-labels whose teacher confidence is >= tau
    mu: int = 7  # unlabelled images per labelled image in a batch
    unlabelled_weight: float = 1.0  # lambda_u
    randaugment_ops: int = 2  # strong views: torchvision RandAugment(ops, magnitude) + erasing
    randaugment_magnitude: int = 10


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)


# Valid choices for string fields that name a registered component. Backbones are checked
# against timm's registry in `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("digits", "cifar10", "cifar100", "imagefolder"),
    "method.name": ("byol", "dino", "supervised", "pseudo_label"),
    "optim.name": ("sgd", "lars", "adam", "adamw"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert int -> float and list -> tuple."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            value = "no"  # YAML 1.1 reads a bare `no` as false: mixed_precision: no
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
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
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
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):  # but "nan" / "inf" stay strings: an error below
                value = number
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
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML"
                              f"{_yaml_problem(e)}") from e
        _set_nested(tree, key.strip(), value)
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
    from ssl_ema.config_checks import validate  # the checks need the schema above

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
            raise ConfigError(f"recipe '{path}' is not valid YAML{_yaml_problem(e)}") from e
        if loaded is None:
            raise ConfigError(f"recipe '{path}' is empty; a recipe names at least its method "
                              "(method: name: byol), see recipes/quickstart.yaml")
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {kind}")
        values = loaded
        values.setdefault("run", {})
        if isinstance(values["run"], dict):
            values["run"].setdefault("name", path.stem)
    values = _merge(values, parse_overrides(overrides))
    method = values.get("method")
    if path is not None and not (isinstance(method, Mapping) and "name" in method):
        raise ConfigError(f"recipe '{path}' names no method; add method.name (one of "
                          f"{', '.join(CHOICES['method.name'])}) instead of training the defaults")
    return from_dict(values)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`` at line L, column C: problem`` of a YAML error (its first line when it has no mark)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return f": {str(e).splitlines()[0]}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


# Methods that train a classifier on labels (ssl_ema.methods.CLASSIFIERS).
CLASSIFICATION_METHODS = ("supervised", "pseudo_label")


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
