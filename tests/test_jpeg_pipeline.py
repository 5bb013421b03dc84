"""data.pipeline=jpeg: the cached file index, the batched decode, the per-sample crops, the
(seed, epoch, index) determinism and resume, and data.corrupt, on tiny generated JPEGs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ssl_ema.config import load_config
from ssl_ema.config_schema import ConfigError
from ssl_ema.data import gpu_augment
from ssl_ema.data.datasets import DataError
from ssl_ema.data.file_index import IndexedFolder, cached_index, scan_folder
from ssl_ema.data.gpu_augment import ViewSpec
from ssl_ema.data.jpeg import FileBytes, JpegTrainStream, decode_batch, resized_crops
from ssl_ema.engine.loaders import build_run_data
from tests.helpers import SIZES, jpeg_folder, resume_from

CPU = torch.device("cpu")


def folder_of(root: Path, cache: Path) -> IndexedFolder:
    classes, samples, _, _ = cached_index(root, cache)
    return IndexedFolder(root, classes, samples)


def stream(folder: IndexedFolder, batch: int, **kw: object) -> JpegTrainStream:
    specs = (ViewSpec(8, blur=1.0), ViewSpec(8, blur=0.1, solarize=0.2))
    return JpegTrainStream(folder, specs, (0.5,) * 3, (0.25,) * 3, batch, CPU, seed=3,
                           **kw)  # type: ignore[arg-type]


def test_the_file_index_is_imagefolders_and_is_reused(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = jpeg_folder(tmp_path / "imgs") / "train"
    classes, samples, cache, reused = cached_index(root, tmp_path / "cache")
    theirs = ImageFolder(str(root))
    assert classes == theirs.classes and not reused and cache.is_file()
    assert [(str(root / p), c) for p, c in samples] == theirs.samples
    again = cached_index(root, tmp_path / "cache")
    assert again[3] and again[:3] == (classes, samples, cache)  # read back, not re-scanned
    # A new file changes its class folder's mtime, so the key: the index is scanned again.
    new = root / "class1" / "zz.jpg"
    new.write_bytes((root / "class1" / "000.jpg").read_bytes())
    os.utime(root / "class1", ns=(time.time_ns(), time.time_ns() + 10**9))
    classes2, samples2, cache2, reused2 = cached_index(root, tmp_path / "cache")
    assert not reused2 and cache2 != cache and ("class1/zz.jpg", 1) in samples2
    assert samples2 == scan_folder(root)[1]


def test_start_up_opens_a_sample_and_lists_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from ssl_ema.data import file_index

    root = jpeg_folder(tmp_path / "imgs", per_class=2)
    tiny = (root / "train" / "class0" / "000.jpg").read_bytes()
    for i in range(300):  # 304 training files: more than the 256 the start-up opens
        (root / "train" / "class1" / f"x{i:03d}.jpg").write_bytes(tiny)
    opened: list[str] = []
    real_open = Image.open

    def counting_open(path: str, *args: object, **kw: object) -> Image.Image:
        opened.append(str(path))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", counting_open)
    base = ["data.dataset=imagefolder", f"data.root={root}", "data.pipeline=jpeg",
            f"data.index_cache={tmp_path / 'cache'}", "data.image_size=8"]
    data = build_run_data(load_config(None, base))
    assert len(data.train) == 304 and len(opened) == 256 + 4  # train's sample, all 4 test files
    # the second start-up lists no folder (the index is read back) and trust opens no file
    monkeypatch.setattr(file_index, "scan_folder", lambda folder: pytest.fail("re-scanned"))
    opened.clear()
    again = build_run_data(load_config(None, [*base, "data.corrupt=trust"]))
    assert again.train.source.samples == data.train.source.samples and opened == []


def test_batched_decode_matches_pil_within_jpeg_tolerance(tmp_path: Path) -> None:
    from PIL import Image

    folder = folder_of(jpeg_folder(tmp_path / "imgs") / "train", tmp_path / "cache")
    files = [folder.read_bytes(i) for i in range(len(folder))]
    decoded, fell_back = decode_batch(files, CPU)
    assert fell_back == []
    for i, image in enumerate(decoded):
        assert image is not None
        pil = torch.from_numpy(np.array(Image.open(folder.samples[i][0]).convert("RGB")))
        assert image.shape == pil.permute(2, 0, 1).shape
        diff = (image.int() - pil.permute(2, 0, 1).int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 8  # IDCT/upsampling rounding only


def test_per_sample_crops_are_torchvisions_resized_crop() -> None:
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in SIZES]
    spec = ViewSpec(8)
    draw = gpu_augment.draw_crops(spec, len(images), g)
    heights, widths = torch.tensor([h for h, _ in SIZES]), torch.tensor([w for _, w in SIZES])
    boxes = gpu_augment.place_crops(spec, draw, heights, widths)
    out = resized_crops(images, boxes, 8)
    for i, (image, (x1, y1, x2, y2)) in enumerate(zip(images, boxes.long().tolist())):
        # each box as if its image had been alone (one size): the same torchvision draw
        alone = gpu_augment.place_crops(spec, draw.take(torch.tensor([i])), *SIZES[i])
        assert alone[0].tolist() == [x1, y1, x2, y2]
        assert 0 <= x1 < x2 <= image.shape[2] and 0 <= y1 < y2 <= image.shape[1]
        ref = TF.resized_crop(image.float() / 255, y1, x1, y2 - y1, x2 - x1, [8, 8],
                              antialias=True)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_views_are_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    folder = folder_of(jpeg_folder(tmp_path / "imgs") / "train", tmp_path / "cache")
    one = stream(folder, 4)
    one.set_epoch(1)
    batches = list(one)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 8, 8)
    # resume: batch 1 alone equals the second batch of the full epoch
    again = stream(folder, 4)
    again.set_epoch(1)
    resumed = next(again.iter_from(1))
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[1]))
    # two ranks of 2: step s, rank r holds the r-th half of the 1-process batch s
    ranks = [stream(folder, 2, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    halves = [list(s) for s in ranks]
    for step in range(2):
        for t in range(3):
            joined = torch.cat([halves[0][step][t], halves[1][step][t]])
            assert torch.equal(joined, batches[step][t])
    # another epoch: another order and other views
    one.set_epoch(2)
    assert not torch.equal(next(iter(one))[0], batches[0][0])


def test_a_batch_across_two_blocks_takes_each_positions_own_draws() -> None:
    from ssl_ema.data.jpeg import BLOCK

    class Files:  # 3 blocks of positions; no file is read
        samples, targets = [("x", 0)] * 3 * BLOCK, [0] * 3 * BLOCK

        def __len__(self) -> int:
            return len(self.samples)

    s = stream(Files(), 64)  # type: ignore[arg-type]
    s.set_epoch(0)
    positions = torch.arange(BLOCK - 24, BLOCK + 40)
    draws, first, second = s.draws(positions), s.block(0), s.block(1)
    for (crop, colour), a, b in zip(draws, first, second):
        assert torch.equal(crop.log_ratio, torch.cat([a[0].log_ratio[-24:], b[0].log_ratio[:40]]))
        assert torch.equal(colour.order, torch.cat([a[1].order[-24:], b[1].order[:40]]))
    assert not torch.equal(first[0][0].scale, second[0][0].scale)  # blocks draw afresh


def test_loader_workers_give_the_same_batches(tmp_path: Path) -> None:
    folder = folder_of(jpeg_folder(tmp_path / "imgs") / "train", tmp_path / "cache")
    a, b = stream(folder, 5), stream(folder, 5, num_workers=2)
    for epoch in (0, 1):  # the workers persist from one epoch (and resume point) to the next
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert all(torch.equal(x, y) for x, y in zip(next(a.iter_from(epoch)),
                                                      next(b.iter_from(epoch))))
    assert FileBytes(folder)[3][1:] == (folder.targets[3], 3)


def test_an_unreadable_file_fails_or_leaves_its_batch(tmp_path: Path) -> None:
    root = jpeg_folder(tmp_path / "imgs", per_class=3)
    bad = root / "train" / "class1" / "001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    base = ["data.dataset=imagefolder", f"data.root={root}", "data.pipeline=jpeg",
            f"data.index_cache={tmp_path / 'cache'}", "data.image_size=8"]
    # start-up: the sampled check (here every file: fewer than 256) names the file
    with pytest.raises(DataError, match=r"001.jpg' is not a readable image \(1 in a sample"):
        build_run_data(load_config(None, base))
    data = build_run_data(load_config(None, [*base, "data.corrupt=skip"]))
    assert data.skipped_files == 1 and len(data.train) == 5
    # lazily (trust: no start-up check): the batch that holds it fails, naming it ...
    folder = build_run_data(load_config(None, [*base, "data.corrupt=trust"])).train.source
    strict = stream(folder, 6)
    strict.set_epoch(0)
    with pytest.raises(DataError, match="001.jpg' is not a readable image.*data.corrupt=skip"):
        next(iter(strict))
    # ... or, under skip, leaves the batch, which keeps the others' views
    lenient = stream(folder, 6, corrupt="skip")
    lenient.set_epoch(0)
    with pytest.warns(UserWarning, match="left out unreadable"):
        batch = next(iter(lenient))
    assert len(batch[0]) == 5 and lenient.skipped == {str(bad)}


def test_a_file_gone_since_start_up_is_one_line_from_a_worker(tmp_path: Path) -> None:
    """The bytes are read in a loader worker: a file removed under a run is named, not an
    OSError (which the trainer reports as a disk fault) under the worker's traceback."""
    root = jpeg_folder(tmp_path / "imgs", per_class=3) / "train"
    folder = folder_of(root, tmp_path / "cache")
    gone = root / "class1" / "002.jpg"
    gone.unlink()
    lazy = stream(folder, 6, num_workers=1)
    lazy.set_epoch(0)
    with pytest.raises(ConfigError) as caught:
        next(iter(lazy))
    assert str(caught.value) == (f"cannot read '{gone}' (No such file or directory), listed at "
                                 "start-up; restore it, or resume without it (the file list is "
                                 "read again when its folder changes)")


def special_jpegs(folder: Path) -> dict[str, Path]:
    """Real files of the kinds a GPU decoder may refuse: greyscale, CMYK and progressive JPEGs,
    and PNGs named .jpg (which no JPEG decoder reads)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    out = {"grey": (rgb.convert("L"), {}), "cmyk": (rgb.convert("CMYK"), {}),
           "progressive": (rgb, {"progressive": True})}
    paths = {}
    for name, (image, options) in out.items():
        paths[name] = folder / f"{name}.jpg"
        image.save(paths[name], "JPEG", quality=90, **options)
    for name in ("png_a", "png_b"):
        paths[name] = folder / f"{name}.jpg"
        rgb.save(paths[name], "PNG")
    return paths


def test_a_refused_file_is_decoded_on_the_cpu_counted_and_said_once(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = jpeg_folder(tmp_path / "imgs", per_class=3)
    special_jpegs(root / "train" / "class0")
    folder = folder_of(root / "train", tmp_path / "cache")
    assert len(folder) == 11
    s = stream(folder, 11)
    s.set_epoch(0)
    (batch,) = list(s)
    assert len(batch[0]) == 11  # every file read: none left out
    # The two PNGs named .jpg: the JPEG decoder refused both, one line says so, both count.
    assert s.decode_fallbacks == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "decoder failed" in line]
    assert len(lines) == 1 and "png_" in lines[0] and "decode_fallbacks" in lines[0]
    s.set_epoch(1)
    list(s)
    assert s.decode_fallbacks == 4 and "decoder failed" not in capsys.readouterr().err


def test_an_unreadable_evaluation_image_is_one_line_or_black(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from ssl_ema.engine.launch import own_line

    root = jpeg_folder(tmp_path / "imgs", per_class=1) / "test"
    (root / "class0" / "000.jpg").write_bytes(b"broken")
    classes, samples, _, _ = cached_index(root, tmp_path / "cache")
    strict = IndexedFolder(root, classes, samples)
    # raised in a loader worker, re-raised here as ConfigError(the worker's traceback): the
    # error keeps its one line (ConfigError), which own_line leaves as it is
    with pytest.raises(ConfigError) as caught:
        list(DataLoader(strict, num_workers=1, collate_fn=list))
    line = (f"'{root / 'class0' / '000.jpg'}' is not a readable image; remove it or set "
            "data.corrupt=skip to evaluate it as a black image")
    assert str(caught.value) == own_line(caught.value) == line
    with pytest.warns(UserWarning, match="evaluated as a black image"):
        image, label = IndexedFolder(root, classes, samples, blank_unreadable=True)[0]
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (0, 0, 0) and label == 0


def test_jpeg_pipeline_config_errors() -> None:
    with pytest.raises(ConfigError, match="data.pipeline=jpeg decodes data.dataset=imagefolder"):
        load_config(None, ["data.pipeline=jpeg", "data.dataset=cifar10"])
    with pytest.raises(ConfigError, match="method.name=supervised: use data.pipeline=loader"):
        load_config(None, ["data.pipeline=jpeg", "data.dataset=imagefolder",
                           "method.name=supervised"])


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "byol_r50_imagenet.yaml"


@pytest.mark.slow  # trains through the real trainer
def test_byol_imagenet_recipe_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """recipes/byol_r50_imagenet.yaml on a slice: its data path (jpeg pipeline), LARS and
    schedules with a tiny backbone at 32 px, 2 steps, resumed bit for bit at step 1."""
    from ssl_ema.engine.trainer import Trainer

    root = jpeg_folder(tmp_path / "imgs", per_class=8)
    tiny = [f"data.root={root}", f"data.index_cache={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path}", "data.image_size=32", "data.num_workers=0",
            "data.eval_subset=6", "model.backbone=test_resnet", "byol.projection_hidden_dim=32",
            "byol.projection_dim=16", "byol.prediction_hidden_dim=32",
            "train.batch_size=4", "train.max_steps=2", "train.checkpoint_every=1",
            "train.keep_checkpoints=3",
            "train.mixed_precision=no", "train.channels_last=false", "train.log_every=1",
            "eval.every_epochs=0", "eval.knn_k=3"]
    cfg = load_config(RECIPE, tiny)
    assert (cfg.optim.name, cfg.optim.lr, cfg.scaling.reference_batch) == ("lars", 3.2, 4096)
    full = Trainer(cfg, tmp_path / "run")
    result = full.fit()
    assert full.state.step == 2 and np.isfinite(result["knn_teacher"])
    assert result["decode_fallbacks"] == 0  # counted in results.json, none here
    assert full.hyper(0).optimizer.lr.value == pytest.approx(3.2 * 4 / 4096)  # lr x B/4096
    resume_from(full, tmp_path / "run", 1)


@pytest.mark.slow  # trains through a subprocess
def test_bench_jpeg_runs_on_a_cpu(tmp_path: Path, tools_env: dict[str, str]) -> None:
    """tools/bench_jpeg.py end to end at tiny sizes, so that the GPU run is known to work."""
    import json
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_jpeg.py"
    args = ["--dir", str(tmp_path / "jpegs"), "--images", "24", "--test-images", "8",
            "--classes", "2", "--size", "40x30", "--batch", "4", "--warmup", "1", "--steps",
            "1", "--workers", "1", "model.backbone=test_resnet", "data.image_size=16",
            "byol.projection_hidden_dim=16", "byol.prediction_hidden_dim=16",
            "byol.projection_dim=8", "eval.knn_k=3"]
    proc = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True,
                          env=tools_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["folder"]["files"] == 32 and result["device"] == "cpu"
    assert result["decoder"] == {"name": "torchvision decode_jpeg on cpu (libjpeg-turbo)",
                                 "decode_fallbacks": 0}
    for key in ("jpeg_pipeline", "jpeg_views_alone", "compute_bound", "loader_and_step"):
        assert result[key] > 0, key
    assert result["jpeg_vs_loader"] == result["jpeg_pipeline"] / result["loader_and_step"]
    assert sorted(p.name for p in (tmp_path / "jpegs" / "train").iterdir()) == ["c0000", "c0001"]
