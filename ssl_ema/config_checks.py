"""Checks of a whole `Config` that its field types cannot express: registered choices, timm model
names, value ranges, labels and their files, batch divisibility, and each method's own checks
(`MethodSpec.check`). `config.from_dict` runs them, so every bad recipe or override fails as one
`ConfigError` line before any work.
"""

from __future__ import annotations

from pathlib import Path

from ssl_ema.config_schema import MAX_SIGMA_REL, Config, ConfigError
from ssl_ema.methods.registry import METHODS, MethodSpec, classification_methods, method_spec

# Valid choices for string fields that name a registered component. Backbones are checked
# against timm's registry below.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("digits", "cifar10", "cifar100", "imagefolder", "given"),
    "method.name": tuple(METHODS),
    "optim.name": ("sgd", "lars", "adam", "adamw"),
}


# data.dataset / model.backbone for objects passed from Python (`ssl_ema.engine.from_python`).
GIVEN = "given"


def refuse_given_keys(cfg: Config) -> None:
    """A recipe run (tools/train.py) cannot name objects that only Python can pass."""
    for key, value, argument in (("data.dataset", cfg.data.dataset, "train_set=..., test_set=..."),
                                 ("model.backbone", cfg.model.backbone, "backbone=...")):
        if value == GIVEN:
            raise ConfigError(f"{key}=given: set by ssl_ema.train({argument}) from Python "
                              "(docs/PYTHON_API.md); name one here")


def _validate_backbone(name: str) -> None:
    """A timm model name. timm (and with it torch) is imported here, only once every key and
    type of the recipe has been read, so a recipe's typo is reported without loading torch."""
    if name == GIVEN:
        return
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ConfigError(f"model.backbone: unknown timm model '{name}'{hint}")


def validate(cfg: Config) -> None:
    """Check choices and cross-field constraints that the types alone cannot express."""
    for dotted, valid in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in valid:
            raise ConfigError(f"{dotted}: unknown value '{value}'; valid: {', '.join(valid)}")
    _validate_backbone(cfg.model.backbone)
    spec = method_spec(cfg.method.name)
    _validate_pipeline(cfg, spec)
    _validate_ranges(cfg)
    _validate_views(cfg, spec)
    if cfg.optim.nesterov and cfg.optim.name != "sgd":
        raise ConfigError(f"optim.nesterov: applies to optim.name=sgd, not {cfg.optim.name}")
    _validate_batches(cfg)
    _validate_labels(cfg)
    _validate_trackers(cfg.run.log_with)
    if spec.check is not None:
        spec.check(cfg)


def _validate_pipeline(cfg: Config, spec: MethodSpec) -> None:
    """data.pipeline against the data set and what the method registers for each pipeline."""
    if cfg.data.pipeline == "device" and cfg.data.dataset == "digits":
        raise ConfigError("data.pipeline=device makes RGB views (colour ops); the grey "
                          "digits use data.pipeline=loader")
    if cfg.data.pipeline == "device" and spec.device_views is None and not spec.device_classify:
        device = ", ".join(name for name, s in METHODS.items()
                           if s.device_views is not None or s.device_classify)
        raise ConfigError(f"data.pipeline=device makes the views of {device}; method.name="
                          f"{cfg.method.name} uses data.pipeline=loader")
    if cfg.data.pipeline == "jpeg" and (cfg.data.dataset != "imagefolder"
                                        or spec.device_views is None):
        device = ", ".join(name for name, s in METHODS.items() if s.device_views is not None)
        raise ConfigError("data.pipeline=jpeg decodes data.dataset=imagefolder folders on the "
                          f"device for the methods {device}; got data.dataset="
                          f"{cfg.data.dataset}, method.name={cfg.method.name}: use "
                          "data.pipeline=loader")


def _validate_ranges(cfg: Config) -> None:
    """Counts and sizes that must be positive, momenta in [0, 1]."""
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accumulation": cfg.train.grad_accumulation,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.log_every": cfg.train.log_every,
        "data.image_size": cfg.data.image_size,
        "data.jitter_strength": cfg.data.jitter_strength,
        "scaling.reference_batch": cfg.scaling.reference_batch,
        "ema.period": cfg.ema.period,
        "eval.knn_k": cfg.eval.knn_k,
        "optim.lr": cfg.optim.lr,
        "eval.knn_temperature": cfg.eval.knn_temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    momenta = {"method.momentum": cfg.method.momentum,
               "method.momentum_end": cfg.method.momentum_end,
               **{f"ema.extra_momenta[{i}]": m for i, m in enumerate(cfg.ema.extra_momenta)}}
    for key, value in momenta.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: a momentum must lie in [0, 1], got {value}")
    _validate_posthoc(cfg)
    if cfg.train.checkpoint_every_minutes < 0:
        raise ConfigError("train.checkpoint_every_minutes: must be >= 0 (0 = off), got "
                          f"{cfg.train.checkpoint_every_minutes}")


def _validate_posthoc(cfg: Config) -> None:
    posthoc = cfg.ema.posthoc
    for i, sigma_rel in enumerate(posthoc.sigma_rels):
        if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
            raise ConfigError(f"ema.posthoc.sigma_rels[{i}]: {sigma_rel} is outside (0, "
                              f"{MAX_SIGMA_REL:.4f}] ({MAX_SIGMA_REL:.4f}: the uniform average; "
                              "EDM2 tracks 0.05 and 0.10)")
    if len(set(posthoc.sigma_rels)) != len(posthoc.sigma_rels):
        raise ConfigError(f"ema.posthoc.sigma_rels: {list(posthoc.sigma_rels)} repeats a value; "
                          "list each width once")
    if posthoc.every_samples < 0:
        raise ConfigError(f"ema.posthoc.every_samples: must be >= 0 (0 = the run's samples / "
                          f"64), got {posthoc.every_samples}")


def _validate_views(cfg: Config, spec: MethodSpec) -> None:
    """data.views and data.normalize: only where they choose something."""
    if cfg.data.views != "byol" and not spec.pair_views:
        pair = ", ".join(name for name, s in METHODS.items() if s.pair_views)
        raise ConfigError(f"data.views={cfg.data.views}: chooses BYOL's view pair; method "
                          f"{cfg.method.name} makes its own views, so leave data.views=byol "
                          f"(it applies to {pair})")
    grey = {"data.views": cfg.data.views != "byol",
            "data.normalize": cfg.data.normalize != "dataset"}
    for key, changed in grey.items():
        if changed and cfg.data.dataset == "digits":
            raise ConfigError(f"{key}: applies to RGB images; the grey digits have their own "
                              "views and statistics, so leave it at its default")


def _validate_labels(cfg: Config) -> None:
    lab, name = cfg.labels, cfg.method.name
    if method_spec(name).labels == "none" and (
            lab.per_class or lab.noisy != "clean" or lab.val_fraction or lab.symmetric_noise
            or cfg.model.init_from):
        raise ConfigError(f"labels.* and model.init_from apply to the methods "
                          f"{', '.join(classification_methods())}; method '{name}' trains on none")
    if lab.per_class < 0:
        raise ConfigError(f"labels.per_class: must be >= 0, got {lab.per_class}")
    if not 0.0 <= lab.val_fraction < 1.0:
        raise ConfigError(f"labels.val_fraction: must lie in [0, 1), got {lab.val_fraction}")
    if not 0.0 <= lab.symmetric_noise < 1.0:
        raise ConfigError(f"labels.symmetric_noise: must lie in [0, 1), got {lab.symmetric_noise}")
    if lab.symmetric_noise and lab.noisy != "clean":
        raise ConfigError(f"labels.symmetric_noise and labels.noisy={lab.noisy} exclude each "
                          "other: pick synthetic noise or CIFAR-10N's human labels")
    if lab.noisy != "clean":
        if cfg.data.dataset not in ("cifar10", "imagefolder"):
            raise ConfigError(f"labels.noisy={lab.noisy}: CIFAR-10N labels fit CIFAR-10 only; "
                              "use data.dataset=cifar10 or imagefolder (the CIFAR-10 JPEG copy)")
        if not Path(lab.noisy_file).is_file():
            raise ConfigError(f"labels.noisy_file: '{lab.noisy_file}' is not a file; point it at "
                              "CIFAR-10_human.pt (e.g. ../shared/data/cifar10n/CIFAR-10_human.pt)")
    if cfg.model.init_from and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"model.init_from: '{cfg.model.init_from}' is not a file; pass a "
                          ".safetensors or torch state dict of the backbone")


def _validate_trackers(names: tuple[str, ...]) -> None:
    """Each of ``run.log_with`` is one of Accelerate's trackers and is installed (Accelerate
    itself would only warn and log nothing)."""
    if not names:
        return
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if len(set(names)) < len(names):
        raise ConfigError(f"run.log_with: a tracker is listed twice ({', '.join(names)})")
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"run.log_with: unknown tracker '{name}'; valid: "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if not getattr(accelerate.utils, f"is_{name}_available")():
            raise ConfigError(f"run.log_with: {name} is not installed; pip install {name}, or "
                              "drop it from run.log_with")


def _validate_batches(cfg: Config) -> None:
    acc, last_epoch = cfg.train.grad_accumulation, 0
    for i, (epoch, batch) in enumerate(cfg.train.batch_schedule):
        key = f"train.batch_schedule[{i}]"
        if not last_epoch < epoch < cfg.train.epochs:
            raise ConfigError(f"{key}: epoch {epoch} must be after {last_epoch} and before "
                              f"train.epochs {cfg.train.epochs}; list [epoch, batch] in order")
        if batch <= 0:
            raise ConfigError(f"{key}: batch must be positive, got {batch}")
        last_epoch = epoch
    for key, batch in [("train.batch_size", cfg.train.batch_size),
                       *((f"train.batch_schedule[{i}]", b)
                         for i, (_, b) in enumerate(cfg.train.batch_schedule))]:
        if batch % acc:
            raise ConfigError(f"{key}: batch {batch} is not divisible by train.grad_accumulation "
                              f"{acc}; pick a multiple")


