from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_ema.config import load_config
from ssl_ema.data.datasets import DataError, digits_split
from ssl_ema.data.views import DigitsView
from ssl_ema.engine.loaders import build_run_data
from tests.helpers import SHARED_DATA, cut_jpeg_folder, tiny_imagefolder


def test_digits_split_is_stratified_and_fixed() -> None:
    x_tr, x_te, y_tr, y_te = digits_split()
    assert x_tr.shape == (1437, 8, 8) and x_te.shape == (360, 8, 8)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    # stratified: every class holds ~20% of its images in the test split
    for c in range(10):
        frac = (y_te == c).sum() / ((y_te == c).sum() + (y_tr == c).sum())
        assert abs(frac - 0.2) < 0.02
    again = digits_split()
    assert np.array_equal(again[1], x_te)


def test_digits_bundle_views() -> None:
    data = build_run_data(load_config(None, ["data.image_size=16"]))
    v0, v1, y = data.train[0]
    assert v0.shape == v1.shape == (1, 16, 16)
    assert not torch.equal(v0, v1)  # two independent augmentations
    x, y2 = data.train_eval[0]
    assert x.shape == (1, 16, 16) and y == y2
    x_again, _ = data.train_eval[0]
    assert torch.equal(x, x_again)  # evaluation is deterministic
    assert data.num_classes == 10 and data.in_chans == 1


def test_digits_view_is_torchvisions_compose_without_its_dispatch() -> None:
    """The direct-kernel digits view draws and computes what the v2 pipeline does, bit for bit."""
    x = torch.from_numpy(digits_split()[0][:12, None])
    for view in (DigitsView(16, (0.8, 1.0), 0.3, 0.4), DigitsView(8, (0.3, 0.6), 0.3, 0.4)):
        reference = view.compose()
        for i, image in enumerate(x):
            torch.manual_seed(i)
            ours = view(image)
            torch.manual_seed(i)
            assert torch.equal(ours, reference(image)), i
    torch.manual_seed(0)
    assert not torch.equal(view(x[0]), view(x[0]))  # random draws, not a fixed crop


def test_missing_cifar_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}",
                             "data.download=false"])
    with pytest.raises(DataError, match=r"CIFAR-10 not found under data.root=.*set data.root"):
        build_run_data(cfg)


def test_imagefolder_errors(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="has no 'train/' folder"):
        build_run_data(cfg)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_run_data(cfg)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpg.tar.gz").exists(),
                    reason="../shared/data/cifar10-jpg.tar.gz not present (fresh clone)")
def test_imagefolder_on_the_shared_cifar10_copy(tmp_path: Path) -> None:
    # Extract two classes' first images: enough to check layout, labels and views.
    with tarfile.open(SHARED_DATA / "cifar10-jpg.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and
                   any(f"/{c}/000" in m.name for c in ("airplane", "cat"))]
        tar.extractall(tmp_path, members=members, filter="data")
    root = next(p for p in tmp_path.iterdir() if p.is_dir())
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}"])
    data = build_run_data(cfg)
    assert data.num_classes == 2 and data.in_chans == 3
    v0, v1, y = data.train[0]
    assert v0.shape == (3, 32, 32) and y == 0


def test_training_views_are_a_function_of_seed_epoch_and_index() -> None:
    data = build_run_data(load_config(None, ["data.image_size=16"]))
    ds = data.train
    torch.manual_seed(123)
    first = ds[7]
    torch.manual_seed(999)  # the global stream does not matter ...
    torch.rand(10)
    again = ds[7]
    assert all(torch.equal(a, b) for a, b in zip(first[:-1], again[:-1]))
    assert not torch.equal(first[0], first[1])  # ... the two views still differ
    state = torch.get_rng_state()
    ds[8]
    assert torch.equal(state, torch.get_rng_state())  # and it is left untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[7][0], first[0])  # a new epoch draws new views


def test_unreadable_image_fails_or_is_skipped(tmp_path: Path) -> None:
    root = tiny_imagefolder(tmp_path / "imgs")
    base = ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=8"]
    with pytest.raises(DataError, match=r"broken.png' is not a readable image \(1 such files\)"
                                        r".*data.corrupt=skip"):
        build_run_data(load_config(None, base))
    data = build_run_data(load_config(None, [*base, "data.corrupt=skip"]))
    assert data.skipped_files == 1 and len(data.train) == 6 and len(data.test_eval) == 6
    assert len(data.train[5]) == 3  # two views and a label: the survivors still load


def test_a_jpeg_cut_off_mid_data_is_found_at_start_up(tmp_path: Path) -> None:
    cut, base = cut_jpeg_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"001.jpg' is not a readable image \(1 such files\)"):
        build_run_data(load_config(None, base))
    data = build_run_data(load_config(None, [*base, "data.corrupt=skip"]))
    assert data.skipped_files == 1 and len(data.train) == 5  # the padded file is kept
    assert str(cut) not in [path for path, _ in data.train.source.samples]


def test_an_unreadable_image_met_in_a_worker_is_one_line(tmp_path: Path) -> None:
    """data.corrupt=trust: the file is met in a loader worker. PIL's OSError used to read as a
    disk fault ("free space"), under the worker's 30-line traceback."""
    from torch.utils.data import DataLoader

    cut, base = cut_jpeg_folder(tmp_path / "imgs")
    data = build_run_data(load_config(None, [*base, "data.corrupt=trust"]))
    with pytest.raises(DataError) as caught:
        list(DataLoader(data.train_eval, batch_size=6, num_workers=1))
    assert re.fullmatch(rf"'{re.escape(str(cut))}' is not a readable image \(image file is "
                        r"truncated \(\d+ bytes not processed\)\); remove or replace it, then "
                        r"resume \(data.corrupt=fail, the default, or skip checks every file at "
                        r"start-up\)", str(caught.value)), str(caught.value)


def test_empty_data_root_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(DataError, match="no images found under"):
        build_run_data(load_config(None, ["data.dataset=imagefolder",
                                          f"data.root={tmp_path}/empty"]))
