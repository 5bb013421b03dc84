"""Device-pipeline views of the classification methods: RandAugment ops against torchvision,
weak/strong streams as functions of (seed, epoch, index), and the trainer on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.transforms.v2 import _auto_augment as tv_auto

from ssl_ema.data import gpu_randaugment as R
from ssl_ema.data.device_classify import (
    ClassifySpec,
    SemiSupervisedStream,
    SupervisedStream,
    make_view,
)
from tests.helpers import resume_from, rgb_folder, run

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
WEAK, STRONG = ClassifySpec(8), ClassifySpec(8, num_ops=2, magnitude=10)
# ops whose float rounding differs from torchvision's uint8 kernel on a few pixels, by 1 level
NEAR = {"Color", "Sharpness"}


def uint8_images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", R.OPS)
def test_each_op_is_torchvisions(name: str) -> None:
    x = uint8_images(4, 20)  # >= 256 pixels a channel, or equalize leaves an image as is
    x[1] = x[1] // 4 + 90  # a low-contrast image: autocontrast and equalize stretch it
    ra = tv_auto.RandAugment(2, 10)
    i = R.OPS.index(name)
    for sign in (1.0, -1.0) if name in R.SIGNED else (1.0,):
        m = sign * float(R.magnitudes(10, 20, 20)[i])
        want = torch.stack([ra._apply_image_or_video_transform(
            im, name, m, interpolation=ra.interpolation, fill=ra._fill) for im in x]).float()
        op, value = torch.full((4, 1), i), torch.full((4, 1), m)
        got = R.rand_augment(x.float(), op, value)
        diff = (got - want).abs()
        if name in NEAR:
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.03, (name, sign)
        else:
            assert torch.equal(got, want), (name, sign)
        if name != "Identity":
            assert not torch.equal(got, x.float()), name  # the op does something here


def test_magnitudes_are_torchvisions_bins() -> None:
    space = tv_auto.RandAugment._AUGMENTATION_SPACE
    got = R.magnitudes(10, 32, 24)
    for i, name in enumerate(R.OPS):
        bins = space[name][0](R.NUM_BINS, 32, 24)
        assert float(got[i]) == (0.0 if bins is None else pytest.approx(float(bins[10]))), name


def supervised(x: torch.Tensor, batch: int, rank: int = 0, world: int = 1) -> SupervisedStream:
    return SupervisedStream(x, torch.arange(len(x), device=x.device), WEAK, MEAN, STD, batch,
                            seed=3, rank=rank, world=world)


def epoch(s: SupervisedStream | SemiSupervisedStream, e: int, start: int = 0) -> list:
    s.set_epoch(e)
    return list(s.iter_from(start))


def test_weak_views_are_a_function_of_seed_epoch_and_index() -> None:
    x = uint8_images(40, 8)
    one = epoch(supervised(x, 8), 0)
    assert len(one) == 5 and one[0][0].shape == (8, 3, 8, 8) and one[0][0].dtype == torch.float32
    assert sorted(torch.cat([b[1] for b in one]).tolist()) == list(range(40))  # every image once
    s = supervised(x, 8)
    s.set_epoch(0)
    i = int(one[2][1][3])  # the label is the image's index: each view is of its own image
    want = make_view(x[i:i + 1], s.params.take(torch.tensor([i])), WEAK, s.mean, s.std)
    torch.testing.assert_close(one[2][0][3:4], want)
    # the crop of the padded image keeps the image (weak views: no colour change)
    assert torch.isclose(one[2][0][3], want[0]).all()
    halves = [epoch(supervised(x, 4, rank=r, world=2), 0) for r in (0, 1)]
    for step, whole in enumerate(one):
        for v in range(2):
            assert torch.equal(torch.cat([halves[0][step][v], halves[1][step][v]]), whole[v])
    for a, b in zip(epoch(supervised(x, 8), 0, start=3), one[3:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(epoch(supervised(x, 8), 1)[0][0], one[0][0])  # new epoch: new views


def test_pad_crop_flip_moves_pixels() -> None:
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(2, 3, 8, 8).contiguous()
    from ssl_ema.data.device_classify import pad_crop_flip

    offset = torch.tensor([[1, 1], [1, 1]])  # one pixel into the 1-pixel reflect padding
    out = pad_crop_flip(x, offset, torch.tensor([False, True]), 8, 1)
    assert torch.equal(out[0], x[0])  # offset = pad: the image itself
    assert torch.equal(out[1], x[1].flip(-1))


def semi(x: torch.Tensor, batch: int = 4) -> SemiSupervisedStream:
    n, on = len(x), {"device": x.device}
    labelled = torch.arange(0, n, 5, **on)
    unlabelled = torch.tensor([i for i in range(n) if i % 5], **on)
    return SemiSupervisedStream(x, torch.arange(n, **on), 1000 + torch.arange(n, **on), labelled,
                                unlabelled, 2, WEAK, STRONG, MEAN, STD, batch, seed=3)


def test_semi_supervised_views_and_labels() -> None:
    x = uint8_images(40, 8)
    batches = epoch(semi(x), 0)
    assert len(batches) == 4  # 32 unlabelled images, 2 per item, 4 items per batch
    lab, weak, strong, labels = batches[0]
    assert lab.shape == (4, 3, 8, 8) and weak.shape == strong.shape == (4, 2, 3, 8, 8)
    assert labels.shape == (4, 3)
    assert all(int(y) % 5 == 0 for b in batches for y in b[3][:, 0])  # labelled images only
    seen = torch.cat([b[3][:, 1:].flatten() for b in batches]) - 1000  # true labels = index
    assert sorted(seen.tolist()) == [i for i in range(40) if i % 5]  # one pass, every image
    s = semi(x)
    s.set_epoch(0)
    u = int(labels[1, 2]) - 1000  # item 1's second unlabelled image
    want = make_view(x[u:u + 1], s.p_weak.take(torch.tensor([3])), WEAK, s.mean, s.std)
    torch.testing.assert_close(weak[1, 1:2], want)
    strong_box = s.p_strong.erase[3]  # the strong view is erased inside its box, only there
    x1, y1, x2, y2 = strong_box.tolist()
    assert (strong[1, 1, :, y1:y2, x1:x2] == 0).all() and x2 - x1 == y2 - y1 >= 1
    assert not torch.equal(weak, strong)
    again = epoch(semi(x), 0)
    for a, b in zip(again, batches):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


class Calls(TorchFunctionMode):
    """Records each matmul-like or convolution call with the TF32 settings it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", str(func))
        if name in ("conv2d", "matmul", "__matmul__", "mm", "bmm", "einsum", "linear"):
            self.calls.append((name, torch.backends.cudnn.allow_tf32,
                               torch.get_float32_matmul_precision()))
        return func(*args, **(kwargs or {}))


def test_views_and_knn_round_as_fp32_under_the_trainers_tf32() -> None:
    """Under the trainer's TF32 settings, the views run no matmul and their convolutions run
    with TF32 off, as does the kNN similarity (`ssl_ema.precision`); the settings come back."""
    from ssl_ema.data import gpu_augment
    from ssl_ema.eval.knn import knn_classify

    torch.set_float32_matmul_precision("high")  # engine/accelerator.py on a GPU
    try:
        x = uint8_images(8, 8)
        with Calls() as calls:
            epoch(semi(x), 0)  # strong views: every op, sharpness included
            gpu_augment.gaussian_blur(torch.rand(2, 3, 8, 8), torch.tensor([1.0, 0.5]), 1.0)
            f = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
            knn_classify(f[:12], torch.arange(12) % 3, f[12:], 3, k=3)
        convs = [c for c in calls.calls if c[0] == "conv2d"]
        assert convs and all(c[1:] == (False, "highest") for c in calls.calls), calls.calls
        assert {c[0] for c in calls.calls} <= {"conv2d", "mm", "matmul"}
        assert [c for c in calls.calls if c[0] != "conv2d"]  # the kNN similarity
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_equal_cpu_views() -> None:
    """CUDA views equal the CPU's but where fp32 rounding itself may decide otherwise: the
    strong views may differ in no more values than moving every rounding decision's input by
    2 ulps changes on the CPU (tools/view_precision.py: 0.22% on 2,000 32 px images)."""
    from tests.helpers import load_tool

    x = uint8_images(40, 8)
    for a, b in zip(epoch(supervised(x, 8), 0), epoch(supervised(x.cuda(), 8), 0)):
        torch.testing.assert_close(a[0], b[0].cpu(), atol=1e-5, rtol=0)
    cpu = epoch(semi(x), 0)
    with load_tool("view_precision").Perturb(2, seed=0):
        nudged = epoch(semi(x), 0)
    bound = sum(int(((a[2] - n[2]).abs() > 1e-4).sum()) for a, n in zip(cpu, nudged))
    moved = 0
    for a, b in zip(cpu, epoch(semi(x.cuda()), 0)):
        assert torch.equal(a[3], b[3].cpu())
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())  # weak views
        moved += int(((a[2] - b[2].cpu()).abs() > 1e-4).sum())
    total = sum(a[2].numel() for a in cpu)
    print(f"cuda views: {moved} of {total} strong values differ from the CPU's; a 2-ulp "
          f"rounding change moves {bound}")
    assert moved <= max(bound, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rgb_folder(tmp_path_factory.mktemp("rgb"), per_class=20)


@pytest.mark.slow
def test_supervised_on_the_device_pipeline_trains_and_resumes(
        tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_EMA_CPU_THREADS", "1")  # tiny steps: threads only wait on a busy CPU
    steps = ["method.name=supervised", "data.dataset=imagefolder", f"data.root={folder}",
             "data.pipeline=device", "data.image_size=8", "data.eval_subset=0",
             "model.backbone=test_resnet", "model.cifar_stem=false", "train.epochs=2",
             "train.batch_size=32", "train.checkpoint_every=3", "train.keep_checkpoints=5",
             "labels.val_fraction=0.2", "train.max_steps=0", "train.grad_accumulation=1"]
    full, result = run(tmp_path / "full", *steps)  # 160 training images: 5 steps an epoch
    assert full.state.step == 10 and 0.0 <= result["acc_teacher_test"] <= 1.0
    run_dir = tmp_path / "full" / "run"
    resume_from(full, run_dir, 3)  # mid-epoch 0


@pytest.mark.slow
def test_pseudo_label_on_the_device_pipeline_trains(tmp_path: Path, folder: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_EMA_CPU_THREADS", "1")
    trainer, result = run(tmp_path, "method.name=pseudo_label", "data.dataset=imagefolder",
                          f"data.root={folder}", "data.pipeline=device", "data.image_size=8",
                          "data.eval_subset=0", "model.backbone=test_resnet",
                          "model.cifar_stem=false", "labels.per_class=4", "pseudo_label.mu=2",
                          "train.batch_size=16", "train.max_steps=0",
                          "train.grad_accumulation=1", "eval.every_epochs=1")
    # 200 training images: 40 labelled, 160 unlabelled in pairs -> 80 items, 5 steps of 16
    assert trainer.state.step == 5 and trainer.state.samples_seen == 80
    assert 0.0 <= result["mask_rate"] <= 1.0 and 0.0 <= result["acc_teacher_test"] <= 1.0
