"""The run configuration's schema: frozen dataclass sections, `Config`, `ConfigError`.

A recipe holds only the differences from the defaults below. This module is the bottom of the
package: models, data and methods import their types from here; `ssl_ema.config` (the loader)
sits above the method registry and builds a `Config` from YAML and overrides. A method's own
section (e.g. ``moco``) is a dataclass in the method's spec (``methods/moco_spec.py``); a
`Config` holds the run's method's section only, in ``Config.sections``, read with
``cfg.section(MoCoConfig)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message is one line naming the key and the fix.

    Raised in a DataLoader worker (an unreadable image), it comes back in the main process as
    ``ConfigError(text)``, where text is the worker's traceback ending in ``module.Class:
    message`` (torch/_utils.py, ``ExceptionWrapper.reraise``): that message is kept."""

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            text = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(text)


@dataclass(frozen=True)
class RunConfig:
    name: str = ""  # default: the recipe's file stem
    output_dir: str = "runs"
    seed: int = 0
    # Experiment trackers that mirror metrics.jsonl (which stays the record), any of Accelerate's:
    # tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio.
    log_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    # digits | cifar10 | cifar100 | imagefolder | given (data sets passed from Python: set by
    # ssl_ema.train(train_set=..., test_set=...), docs/PYTHON_API.md)
    dataset: str = "digits"
    root: str = "data"  # CIFAR: torchvision layout; imagefolder: root/{train,test}/<class>/*
    download: bool = True  # CIFAR only; offline -> clear error asking for data.root
    image_size: int = 32  # side of the training views
    num_workers: int = 4  # DataLoader workers of the loader pipeline (views are seeded per sample)
    eval_subset: int = 0  # >0: use only this many train/val/test images to evaluate (fast checks)
    # >0: train on the first N training images of every class (in the data set's order), a
    # fixed class-balanced subset, the same for every seed (laptop-scale studies: a network
    # fits noisy labels sooner on fewer images). The validation split is taken from it.
    train_per_class: int = 0
    # imagefolder: files that are not readable images (checked at start-up, before any work):
    # "fail" names the first one and stops; "skip" leaves them
    # out and reports how many; "trust" does not check (huge folders known to be clean).
    # data.pipeline=jpeg checks a seeded sample of 256 files per split at start-up and the others
    # as their batch decodes, under the same policy.
    corrupt: Literal["fail", "skip", "trust"] = "fail"
    # "loader": DataLoader workers run lightly's transforms on the CPU (any data set).
    # "device": the data set is decoded once to uint8 on the accelerator and the views are made
    # there in batched ops (data/gpu_augment.py; RGB only), no loader workers between the
    # data and the model (docs/RESULTS.md, "BYOL training images/s on one H100").
    # "jpeg" (imagefolder): loader workers read each file's bytes, the batch is decoded on the
    # accelerator (torchvision's batched nvJPEG decode; on the CPU without one) and the views
    # are made there as under "device" (data/jpeg.py): for folders too large for its memory.
    pipeline: Literal["loader", "device", "jpeg"] = "loader"
    # data.pipeline=jpeg: where the folder's cached file list lives ("": $XDG_CACHE_HOME or
    # ~/.cache, then ssl_ema/file_index).
    index_cache: str = ""
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
    # any timm model name; "given": a module passed from Python (set by ssl_ema.train(backbone=...))
    backbone: str = "resnet18"
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
    # Teacher momentum rho in teacher <- rho*teacher + (1-rho)*student, cosine from
    # momentum to momentum_end over training (BYOL, Grill et al. 2020, Sec. 3.2).
    momentum: float = 0.99
    momentum_end: float = 1.0


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
    # BatchNorm running statistics are an EMA too, stepped per forward: PyTorch's momentum 0.1
    # for a forward of the reference batch, scaled per forward (ssl_ema/momentum.py).
    batchnorm: bool = True


# sigma_rel of gamma = 0, the uniform average of every student so far: the widest post-hoc EMA
# profile that does not weigh early students above late ones (gamma < 0 would; Karras et al.
# 2024). Here, not in `ssl_ema.posthoc`, so that checking a recipe imports no torch.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


@dataclass(frozen=True)
class PostHocConfig:
    """Post-hoc EMA (Karras et al. 2024, "EDM2", Sec. 3): power EMAs of the student, stored as
    snapshots in ``<run>/posthoc_ema/``, from which ``tools/posthoc_ema.py`` reconstructs the
    EMA of any sigma_rel after training (docs/EVALUATION.md). An evaluated model of the
    student, like ema.extra_momenta: the training teacher stays the recipe's."""

    # Relative widths of the tracked power EMAs (EDM2 tracks 0.05 and 0.10), each in
    # (0, 0.2887]; empty = off.
    sigma_rels: tuple[float, ...] = ()
    every_samples: int = 0  # snapshot interval in samples seen; 0 = the run's samples / 64
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # of the snapshots on disk


@dataclass(frozen=True)
class EMAConfig:
    # Momenta are per optimizer step at the reference batch; see ssl_ema/momentum.py.
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
    posthoc: PostHocConfig = field(default_factory=PostHocConfig)


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
    channels_last: bool = False  # NHWC activations: the layout tensor-core convolutions use
    # torch.compile the method (Accelerate's dynamo plugin) and the device views' colour ops;
    # the first steps then take a minute longer (Triton on GPU, a C++ compiler on CPU).
    compile: bool = False


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200  # neighbours of the weighted kNN (Wu et al. 2018); k = 20 suits digits
    knn_temperature: float = 0.1  # kNN vote weights exp(cosine / temperature)
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
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    # The run's method's own section (a dataclass registered with the method,
    # `ssl_ema.methods.registry`), by its top-level key; `section` reads it (defaults if absent).
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, cls: type[T]) -> T:
        """The method section of type ``cls`` (its defaults if the run's method has another)."""
        for value in self.sections.values():
            if type(value) is cls:
                return value
        return cls()


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    tree = plain(dataclasses.asdict(cfg))
    sections = tree.pop("sections")
    return {**tree, **sections}  # method sections at the top level, as in a recipe


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
