"""Parity with lightly's CIFAR-10 benchmarks (lightly commit 42a6a924, the table of 27.03.2023).

Their script (docs/source/getting_started/benchmarks/cifar10_benchmark.py) trains when imported,
so `LightlyBYOL` and `LightlyDINO` rebuild its BYOLModel and DINOModel here from lightly's
building blocks, and `train_theirs` replaces PyTorch Lightning's loop: per batch
``training_step`` (which first updates the teacher), backward, SGD step, zero_grad; the
CosineAnnealingLR steps once per epoch (Lightning's default interval). Ours is the real
`Trainer` on the like-for-like recipes, fed the same views. Everything runs in float64.

Mappings, theirs -> ours:
- backbone: ``Sequential(*ResNetGenerator("resnet-18").children()[:-1], AdaptiveAvgPool2d(1))``
  -> timm's resnet18 with the CIFAR stem and ``model.stem_activation=false``; parameter names
  by `to_timm` ("0" conv1, "1" bn1, "2".."5" layer1..4, "shortcut" -> "downsample").
- BYOL: backbone, projection_head, prediction_head -> student backbone, projection,
  prediction; backbone_momentum, projection_head_momentum -> teacher backbone, projection.
- DINO: backbone, head -> student backbone, head; teacher_backbone, teacher_head -> teacher
  backbone, head; criterion.center -> criterion.center (same lightly DINOLoss).
- optimizer: their one SGD group over the student, decayed -> ours with
  ``optim.decay_norm_bias=true`` (one decayed group); lr 0.06 * batch / 128 -> ``optim.lr=0.06``
  at ``scaling.reference_batch=128`` under ``scaling.rule=optimizer`` (momenta unscaled).
- schedule: CosineAnnealingLR(T_max=epochs) stepped per epoch -> ``optim.schedule_per_epoch``.
- momentum: they update the teacher at the start of a step, we after the optimizer step. Every
  forward pass sees the same teacher when ours starts from their teacher after its first update
  (for BYOL that is the student; their DINO teacher head has its own random init), and after n
  steps our teacher equals theirs after one more update (`update_teacher`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, NegativeCosineSimilarity
from lightly.models import ResNetGenerator
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import SimCLRTransform
from lightly.utils.benchmarking import knn_predict
from torch import nn

from ssl_ema.config import load_config
from ssl_ema.engine.loaders import build_run_data
from ssl_ema.engine.trainer import Trainer
from ssl_ema.eval.evaluations import KNNEvaluation
from ssl_ema.eval.features import extract_features
from ssl_ema.eval.knn import knn_classify
from ssl_ema.models.backbones import build_backbone

ROOT = Path(__file__).resolve().parents[1]
BATCH, SIZE, EPOCHS, STEPS = 8, 4, 3, 5  # 2 steps per epoch: the lr changes twice in 5 steps


# ----------------------------------------------------------------------------- their models
def lightly_backbone() -> nn.Module:
    resnet = ResNetGenerator("resnet-18")
    return nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))


class LightlyBYOL(nn.Module):
    """lightly's benchmark BYOLModel at 42a6a924, without Lightning."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = lightly_backbone()
        self.projection_head = BYOLProjectionHead(512, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def update_teacher(self) -> None:
        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)

    def training_step(self, batch: tuple[torch.Tensor, ...], epoch: int) -> torch.Tensor:
        self.update_teacher()
        x0, x1 = batch[0], batch[1]
        p0, p1 = (self.prediction_head(self.projection_head(self.backbone(x).flatten(1)))
                  for x in (x0, x1))
        with torch.no_grad():
            z0, z1 = (self.projection_head_momentum(self.backbone_momentum(x).flatten(1))
                      for x in (x0, x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def student_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projection_head.parameters(),
                *self.prediction_head.parameters()]

    def mapped(self) -> dict[str, dict[str, torch.Tensor]]:
        """Our module key -> its state dict, for the student and the teacher."""
        return {"student.backbone": to_timm(self.backbone.state_dict()),
                "student.projection": self.projection_head.state_dict(),
                "student.prediction": self.prediction_head.state_dict(),
                "teacher.backbone": to_timm(self.backbone_momentum.state_dict()),
                "teacher.projection": self.projection_head_momentum.state_dict()}

    def mapped_grads(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"student.backbone": to_timm(grads(self.backbone)),
                "student.projection": grads(self.projection_head),
                "student.prediction": grads(self.prediction_head)}


def lightly_dino_head() -> DINOProjectionHead:
    head = DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True)
    head.layers = ProjectionHead([(512, 2048, nn.BatchNorm1d(2048), nn.GELU()),
                                  (2048, 256, None, None)]).layers  # "only 2 layers for cifar10"
    return head


class LightlyDINO(nn.Module):
    """lightly's benchmark DINOModel at 42a6a924, without Lightning."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = lightly_backbone()
        self.head = lightly_dino_head()
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_head = lightly_dino_head()  # its own init, not a copy of the student's
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=2048)

    def update_teacher(self) -> None:
        update_momentum(self.backbone, self.teacher_backbone, m=0.99)
        update_momentum(self.head, self.teacher_head, m=0.99)

    def training_step(self, batch: tuple[torch.Tensor, ...], epoch: int) -> torch.Tensor:
        self.update_teacher()
        views = list(batch[:-1])
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher_backbone(v).flatten(1))
                           for v in views[:2]]
        student_out = [self.head(self.backbone(v).flatten(1)) for v in views]
        return self.criterion(teacher_out, student_out, epoch=epoch)

    def student_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.head.parameters()]

    def mapped(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"student.backbone": to_timm(self.backbone.state_dict()),
                "student.head": self.head.state_dict(),
                "teacher.backbone": to_timm(self.teacher_backbone.state_dict()),
                "teacher.head": self.teacher_head.state_dict(),
                "criterion": self.criterion.state_dict()}

    def mapped_grads(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"student.backbone": to_timm(grads(self.backbone)),
                "student.head": grads(self.head)}


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in module.named_parameters() if p.requires_grad}


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their backbone's parameter names -> timm's ResNet names."""
    stem = {"0": "conv1", "1": "bn1"}
    out = {}
    for key, value in state.items():
        first, _, rest = key.partition(".")
        name = f"{stem[first]}.{rest}" if first in stem else \
            f"layer{int(first) - 1}.{rest.replace('shortcut', 'downsample')}"
        out[name] = value
    return out


class Record:
    """What a run did: the first step's loss and student gradients, and each step's lr."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.lrs: list[float] = []


def train_theirs(model: nn.Module, batches: list[tuple[torch.Tensor, ...]], lr: float) -> Record:
    """Lightning's automatic optimisation of their module for STEPS steps."""
    model.train()
    optim = torch.optim.SGD(model.student_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optim, EPOCHS)
    per_epoch, record = len(batches) // EPOCHS, Record()
    for step, batch in enumerate(batches[:STEPS]):
        loss = model.training_step(batch, epoch=step // per_epoch)
        loss.backward()
        if step == 0:
            record.loss = loss.item()
            record.grads = {path: {k: g.clone() for k, g in grads.items()}
                            for path, grads in model.mapped_grads().items()}
        record.lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        optim.zero_grad()
        if (step + 1) % per_epoch == 0:
            scheduler.step()
    return record


def first_teacher(theirs: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Their mapped state with the teacher their first forward sees (after one update);
    their own state is left as it was (weight-normed heads cannot be deep-copied)."""
    saved = {k: v.clone() for k, v in theirs.state_dict().items()}
    theirs.update_teacher()
    mapped = {path: {k: v.clone() for k, v in state.items()}
              for path, state in theirs.mapped().items()}
    theirs.load_state_dict(saved)
    return mapped


# ----------------------------------------------------------------------------- ours
class FixedBatches:
    """Stands in for the training loader: the given batches, ``per_epoch`` per epoch."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]], per_epoch: int):
        self.batches, self.per_epoch, self.epoch = batches, per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return iter(self.batches[self.epoch * self.per_epoch:(self.epoch + 1) * self.per_epoch])


def tiny_imagefolder(root: Path, n: int = 2 * BATCH) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for i in range(n):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (SIZE, SIZE), (20 * i, 100, 200 - 10 * i)).save(folder / f"{i}.png")
    return root


def recipe(name: str, tmp_path: Path, *extra: str):
    """The like-for-like recipe, on tiny images, loader views, fp32 -> float64, no eval."""
    folder = tiny_imagefolder(tmp_path / "images")
    return load_config(ROOT / "recipes" / name, [
        "data.dataset=imagefolder", f"data.root={folder}", f"data.image_size={SIZE}",
        "data.num_workers=0", "data.pipeline=loader", f"train.batch_size={BATCH}",
        f"train.epochs={EPOCHS}", f"train.max_steps={STEPS}", "train.mixed_precision=no",
        "train.compile=false", "train.channels_last=false", "train.checkpoint_every=0",
        "train.log_every=1000", "eval.every_epochs=0", "eval.knn_k=2",  # a bank of 16 images
        f"run.output_dir={tmp_path}", *extra])


def load_ours(model: nn.Module, mapped: dict[str, dict[str, torch.Tensor]]) -> None:
    for path, state in mapped.items():
        model.get_submodule(path).load_state_dict(state, strict=True)


def train_ours(cfg, tmp_path: Path, theirs: nn.Module, batches: list) -> tuple[nn.Module, Record]:
    """The trainer on ``batches`` from their initial weights; records as `train_theirs`."""
    trainer = Trainer(cfg, tmp_path / "run")
    torch.set_num_threads(1)  # the trainer takes every core; tiny tensors run faster on one
    (tmp_path / "run").mkdir()  # as fit's header does
    model, record = trainer.model, Record()
    load_ours(model, first_teacher(theirs))
    trainer.train_loaders = {BATCH: FixedBatches(batches, len(batches) // EPOCHS)}
    forward, before_step = trainer.forward, model.before_optimizer_step

    def recording_forward(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        out = forward(batch)
        if record.loss is None:
            record.loss = out["loss"].item()
        return out

    def recording_before_step() -> None:  # gradients final, lr set, the step not yet taken
        if not record.grads:
            record.grads = {path: {k: p.grad.clone() for k, p in
                                   model.get_submodule(path).named_parameters() if p.requires_grad}
                            for path in theirs.mapped_grads()}
        record.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        before_step()

    trainer.forward, model.before_optimizer_step = recording_forward, recording_before_step
    while trainer.state.step < STEPS:
        trainer.train_epoch()
    return model, record


def assert_same(ours: nn.Module, theirs: dict[str, dict[str, torch.Tensor]], tol: float = 1e-9
                ) -> None:
    """Every tensor within ``tol``, relative to the largest value where that exceeds 1 (BatchNorm
    running variances reach ~1e3 here)."""
    for path, state in theirs.items():
        mine = ours.get_submodule(path).state_dict()
        assert mine.keys() == state.keys(), path
        for key, value in state.items():
            diff = (mine[key].double() - value.double()).abs().max().item()
            scale = max(1.0, value.double().abs().max().item())
            assert diff <= tol * scale, f"{path}.{key}: max difference {diff:.3g} ({scale:.3g})"


@pytest.fixture
def float64():
    """float64 everywhere, on one thread (tiny tensors: more threads only add overhead)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def views(n_views: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(*(torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(n_views)),
             torch.zeros(BATCH, dtype=torch.int64)) for _ in range(steps)]


CASES = {"byol": ("byol_r18_lightly.yaml", LightlyBYOL), "dino": ("dino_r18_lightly.yaml",
                                                                    LightlyDINO)}


# ----------------------------------------------------------------------------- the tests
def test_the_stem_relu_is_what_tells_the_backbones_apart(float64) -> None:
    torch.manual_seed(0)
    theirs = lightly_backbone().eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    for stem_activation, same in ((False, True), (True, False)):
        ours = build_backbone("resnet18", cifar_stem=True, init="torch",
                              stem_activation=stem_activation).eval()
        ours.load_state_dict(to_timm(theirs.state_dict()), strict=True)
        assert torch.allclose(ours(x), theirs(x).flatten(1), rtol=0, atol=1e-12) is same


@pytest.mark.slow
@pytest.mark.parametrize("method", ["byol", "dino"])
def test_training_matches_theirs(method: str, tmp_path: Path, float64) -> None:
    """The first step's loss and gradients within 1e-12; the lr of every step; student, teacher
    (and DINO's centre) within 1e-9 after 5 steps through the trainer."""
    name, cls = CASES[method]
    torch.manual_seed(0)
    theirs = cls()
    batches = views(2, EPOCHS * 2)
    ours, our_record = train_ours(recipe(name, tmp_path), tmp_path, theirs, batches)
    their_record = train_theirs(theirs, batches, lr=0.06 * BATCH / 128)
    assert abs(our_record.loss - their_record.loss) <= 1e-12
    for path, their_grads in their_record.grads.items():
        assert our_record.grads[path].keys() == their_grads.keys()
        for key, grad in their_grads.items():
            diff = (our_record.grads[path][key] - grad).abs().max().item()
            assert diff <= 1e-12, f"gradient of {path}.{key}: max difference {diff:.3g}"
    # CosineAnnealingLR stepped per epoch: 3 values in 5 steps, which a per-step cosine is not
    assert our_record.lrs == pytest.approx(their_record.lrs, rel=1e-12, abs=0)
    assert len(set(their_record.lrs)) == 3
    theirs.update_teacher()  # what their step 6 would do first: our teacher is one update ahead
    assert_same(ours, theirs.mapped())


def ks_distance(a: torch.Tensor, b: torch.Tensor, n: int = 20_000) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of the first ``n`` entries (i.i.d. draws): the
    largest gap between the empirical CDFs."""
    a, b = a.flatten()[:n].double().sort().values, b.flatten()[:n].double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def test_torch_init_draws_resnet_generators_distributions() -> None:
    """Per layer, ``model.init: torch`` and ResNetGenerator's weights pass a two-sample KS test
    at alpha = 0.001; timm's init (the control) fails it on every block convolution."""
    torch.manual_seed(0)
    theirs = to_timm(lightly_backbone().state_dict())
    ours = build_backbone("resnet18", cifar_stem=True, init="torch", stem_activation=False)
    timm_init = build_backbone("resnet18", cifar_stem=True, init="timm")
    assert theirs.keys() == ours.state_dict().keys()
    c_alpha = math.sqrt(-math.log(0.001 / 2) / 2)
    rejected_timm: list[bool] = []
    for key, mine in ours.state_dict().items():
        ref = theirs[key]
        if mine.dim() < 4:  # BatchNorm: weight 1, bias 0, fresh statistics on both sides
            assert torch.equal(mine, ref), key
            continue
        n = min(mine.numel(), 20_000)
        critical = c_alpha * math.sqrt(2 / n)
        assert ks_distance(mine, ref) < critical, key
        bound = 1 / math.sqrt(mine[0].numel())  # Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), .)
        assert mine.abs().max() <= bound and ref.abs().max() <= bound, key
        rejected_timm.append(ks_distance(timm_init.state_dict()[key], ref) > critical)
    # The 16 3x3 and 3 1x1 block convolutions; not the CIFAR stem, a fresh nn.Conv2d with
    # PyTorch's init under either setting (`apply_cifar_stem`).
    assert rejected_timm == [False] + [True] * 19


def test_knn_predicts_as_lightlys_benchmark_module() -> None:
    """Our evaluation path (features in eval mode, L2-normalised, chunked kNN, k capped) against
    lightly's BenchmarkModule procedure with its knn_predict."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    nn.init.uniform_(backbone[1].running_mean, -1, 1)  # eval mode must use these statistics
    bank_x, query_x = torch.randn(150, 3, SIZE, SIZE), torch.randn(40, 3, SIZE, SIZE)
    bank_y, query_y = torch.randint(0, 10, (150,)), torch.randint(0, 10, (40,))
    backbone.train()
    bank, labels = extract_features(backbone, [(bank_x[i:i + 64], bank_y[i:i + 64])
                                               for i in range(0, 150, 64)])
    query, _ = extract_features(backbone, [(query_x, query_y)])
    ours = knn_classify(bank, labels, query, 10, k=200, temperature=0.1, chunk=16)
    backbone.eval()
    with torch.no_grad():  # BenchmarkModule: on_validation_epoch_start, validation_step
        their_bank = torch.cat([F.normalize(backbone(bank_x[i:i + 64]).squeeze(), dim=1)
                                for i in range(0, 150, 64)]).t().contiguous()
        their_query = F.normalize(backbone(query_x).squeeze(), dim=1)
    theirs = knn_predict(their_query, their_bank, bank_y, 10, knn_k=150, knn_t=0.1)[:, 0]
    assert torch.equal(ours, theirs)
    assert backbone.training is False  # extract_features restored the mode it found


def test_best_over_evaluations_is_reported_and_resumed() -> None:
    ev = KNNEvaluation(None)
    for epoch, (t, s) in enumerate([(0.50, 0.40), (0.70, 0.65), (0.60, 0.66)], start=1):
        ev._track_best({"knn_teacher": t, "knn_student": s}, epoch)
    again = KNNEvaluation(None)
    again.load_state_dict(ev.state_dict())
    assert again.summary() == {"best_knn_teacher": 0.70, "best_knn_teacher_epoch": 2,
                               "best_knn_student": 0.66, "best_knn_student_epoch": 3}


def test_recipe_views_are_lightlys_simclr_views(tmp_path: Path) -> None:
    """The loader pipeline builds their SimCLRTransform(input_size=32, cj_strength=0.5,
    gaussian_blur=0.0) with ImageNet statistics, the same for both views."""
    cfg = recipe("byol_r18_lightly.yaml", tmp_path, "data.image_size=32")
    ours = build_run_data(cfg).train.transform
    theirs = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    assert [described(t) for t in ours.transforms] == [described(t) for t in theirs.transforms]


def described(view: object) -> list[str]:
    """A view transform's steps: torchvision's repr, or lightly's own with their attributes."""
    return [f"{type(t).__name__}{sorted(vars(t).items())}" if " at 0x" in repr(t) else repr(t)
            for t in view.transform.transforms]  # type: ignore[attr-defined]
