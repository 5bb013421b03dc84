"""data.pipeline=device: batches as functions of (seed, epoch, index), and the trainer on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_ema.config import ConfigError, load_config
from ssl_ema.data import gpu_augment as A
from ssl_ema.data.device import DeviceTrainStream
from ssl_ema.data.uint8 import decode_uint8
from tests.helpers import resume_from, rgb_folder, run

SPECS = A.byol_specs(8)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def stream(images: torch.Tensor, batch: int, rank: int = 0, world: int = 1
           ) -> DeviceTrainStream:
    labels = torch.arange(len(images))
    return DeviceTrainStream(images, labels.to(images.device), SPECS, MEAN, STD, batch, seed=3,
                             rank=rank, world=world)


def images(n: int = 40, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g).to(device)


def epoch(s: DeviceTrainStream, e: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    s.set_epoch(e)
    return list(s.iter_from(start))


def test_views_are_a_function_of_seed_epoch_and_index() -> None:
    x = images()
    one = epoch(stream(x, 8), 0)
    assert len(one) == 5 and [b[0].shape for b in one[:1]] == [(8, 3, 8, 8)]
    labels = torch.cat([b[2] for b in one])
    assert sorted(labels.tolist()) == list(range(40))  # a permutation: every sample once
    # each view is the sample's own image under the sample's own parameters
    s = stream(x, 8)
    s.set_epoch(0)
    b0 = one[0]
    i = int(b0[2][5])
    want = A.augment(x[i:i + 1], s._params[0].take(torch.tensor([i])), SPECS[0],
                     s.mean, s.std)
    torch.testing.assert_close(b0[0][5:6], want)
    # two ranks at half the batch: rank r's batch is the r-th half of the 1-process batch
    halves = [epoch(stream(x, 4, rank=r, world=2), 0) for r in (0, 1)]
    for step, whole in enumerate(one):
        for v in range(3):
            torch.testing.assert_close(torch.cat([halves[0][step][v], halves[1][step][v]]),
                                       whole[v])
    # resuming mid-epoch: the same batches as the uninterrupted epoch
    for a, b in zip(epoch(stream(x, 8), 0, start=3), one[3:]):
        torch.testing.assert_close(a[0], b[0])
    assert not torch.equal(epoch(stream(x, 8), 1)[0][0], one[0][0])  # a new epoch: new views
    assert not torch.equal(one[0][0], one[0][1])  # two views of the same images differ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_equal_cpu_views() -> None:
    cpu = epoch(stream(images(), 8), 0)
    gpu = epoch(stream(images(device="cuda"), 8), 0)
    for a, b in zip(cpu, gpu):
        for va, vb in zip(a, b):
            torch.testing.assert_close(va, vb.cpu(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rgb_folder(tmp_path_factory.mktemp("rgb"))


def device_run(folder: Path) -> list[str]:
    return ["data.dataset=imagefolder", f"data.root={folder}", "data.pipeline=device",
            "data.image_size=8", "data.eval_subset=0", "model.backbone=test_resnet",
            "model.cifar_stem=false"]


def test_decoded_images_are_the_folder(folder: Path) -> None:
    from torchvision.datasets import ImageFolder

    source = ImageFolder(str(folder / "train"))
    x, y = decode_uint8(source, num_workers=0)
    assert x.shape == (400, 3, 16, 16) and x.dtype == torch.uint8
    image, label = source[123]
    assert torch.equal(x[123], torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert int(y[123]) == label


def test_digits_on_the_device_pipeline_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.pipeline=device.*digits"):
        load_config(None, ["data.pipeline=device"])
    # the classification methods have device views since issue 20 (test_device_classify.py)
    load_config(None, ["data.pipeline=device", "data.dataset=cifar10", "method.name=supervised"])


@pytest.mark.slow
def test_device_pipeline_trains_and_resumes_exactly(tmp_path: Path, folder: Path) -> None:
    """The trainer on device batches: the same run as resumed mid-epoch, bit for bit on CPU,
    and kNN evaluated on the device-held images (every image of both splits)."""
    steps = [*device_run(folder), "train.max_steps=0", "train.epochs=2", "train.batch_size=64",
             "train.grad_accumulation=1", "train.checkpoint_every=4", "train.keep_checkpoints=5"]
    full, result = run(tmp_path / "full", *steps)  # 400 // 64 = 6 steps per epoch
    assert full.state.step == 12 and full.state.samples_seen == 12 * 64
    assert 0.1 < result["knn_random"] <= 1.0 and 0.1 < result["knn_teacher"] <= 1.0
    run_dir = tmp_path / "full" / "run"
    resumed = resume_from(full, run_dir, 4)  # mid-epoch 0
    assert resumed.state.state_dict() == full.state.state_dict()
