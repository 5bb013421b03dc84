"""The Python API: ``import ssl_ema`` (version, lazy public names), training on the caller's own
data set and backbone, and docs/PYTHON_API.md's example, run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ssl_ema
from ssl_ema.config import ConfigError, load_config
from ssl_ema.data.custom import given_data
from ssl_ema.data.datasets import DataError
from ssl_ema.engine.loaders import build_run_data
from ssl_ema.engine.run import refuse_given
from ssl_ema.eval.trained import load_run
from ssl_ema.methods.registry import method_data
from ssl_ema.models.custom import backbone_builder
from tests.helpers import ROOT, TINY

DOC = ROOT / "docs" / "PYTHON_API.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_version_is_written_once() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ssl_ema.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ssl_ema.__version__)


def test_import_is_cheap_and_names_resolve() -> None:
    """`import ssl_ema` loads no torch; every public name then resolves to its module's."""
    code = "import sys, ssl_ema; print('torch' in sys.modules, ssl_ema.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", ssl_ema.__version__]
    from ssl_ema.ema import EMA
    from ssl_ema.methods.registry import METHODS, register
    from ssl_ema.scaling import kappa

    assert (ssl_ema.EMA, ssl_ema.kappa, ssl_ema.register) == (EMA, kappa, register)
    assert ssl_ema.METHODS is METHODS and "byol" in METHODS  # the registry is filled
    assert all(hasattr(ssl_ema, name) for name in ssl_ema.__all__)
    assert set(ssl_ema.__all__) == {"__version__", *ssl_ema._EXPORTS}
    assert set(ssl_ema.__all__) <= set(dir(ssl_ema))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ssl_ema.nope  # noqa: B018


def test_scaling_block_of_the_doc() -> None:
    ns: dict = {}
    exec(doc_blocks()[2], ns)
    assert ns["k"] == 4.0
    assert ssl_ema.update_momentum(0.996, kappa=ns["k"]) == pytest.approx(0.996 ** 4)


class Items(torch.utils.data.Dataset):
    """(image, label) items of any of the accepted image types."""

    def __init__(self, images: list, labels: list[int]):
        self.images, self.labels_ = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple:
        return self.images[i], self.labels_[i]


def test_given_data_converts_every_image_type_and_counts_classes() -> None:
    cfg = load_config(None, ["data.image_size=8"])
    grey = torch.full((1, 8, 8), 0.5)  # float (C, H, W) tensor, one channel
    array = np.full((8, 8, 3), 255, dtype=np.uint8)  # (H, W, C) uint8 array
    pil = Image.new("L", (8, 8), 0)
    train = Items([grey, array, pil], [0, 4, 2])
    bundle = given_data(cfg, method_data(cfg), train, train)
    assert bundle.num_classes == 5 and bundle.in_chans == 3  # largest label + 1; RGB
    x, label = bundle.train_eval[0]
    assert x.shape == (3, 8, 8) and label == 0
    # ImageNet normalisation of 0.5 (127/255: PIL's uint8 truncates 127.5), then 255 and 0
    mean, std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
    for i, value in [(0, 127 / 255), (1, 1.0), (2, 0.0)]:
        expected = ((value - mean) / std)[:, None, None].expand(3, 8, 8)
        assert torch.allclose(bundle.train_eval[i][0], expected, atol=1e-6), i
    assert bundle.train.source.targets.tolist() == [0, 4, 2]  # read from the items
    views = bundle.train[1]
    assert len(views) == 3 and views[0].shape == (3, 8, 8)  # BYOL's two views + the label
    assert given_data(cfg, method_data(cfg), train, train, num_classes=7).num_classes == 7


def test_given_data_refuses_bad_sets() -> None:
    cfg = load_config(None, ["data.image_size=8"])
    ok = Items([torch.zeros(3, 8, 8)] * 2, [0, 1])
    with pytest.raises(DataError, match="train_set: expected a non-empty"):
        given_data(cfg, method_data(cfg), Items([], []), ok)
    with pytest.raises(DataError, match="items must be"):
        given_data(cfg, method_data(cfg), ok, Items(["not an image"], [0]))
    with pytest.raises(DataError, match="at least 2"):
        given_data(cfg, method_data(cfg), Items([torch.zeros(3, 8, 8)], [0]), ok)
    with pytest.raises(ConfigError, match="give both train_set and test_set"):
        ssl_ema.train(None, train_set=ok)
    with pytest.raises(DataError, match="^data.dataset=given: the data sets are passed from "
                                        "Python"):  # e.g. tools/train.py data.dataset=given
        build_run_data(load_config(None, ["data.dataset=given"]))


def test_labels_outside_the_classes_are_refused_up_front(tmp_path: Path) -> None:
    """A label of -1 (or >= num_classes) is one line naming the item, before any run folder;
    it used to fail inside the kNN vote at the first evaluation."""
    images = [torch.zeros(3, 8, 8)] * 3
    ok = Items(images, [0, 1, 1])
    out = [f"run.output_dir={tmp_path}", "data.image_size=8"]
    with pytest.raises(DataError, match=r"^train_set\[1\] has label -1, outside the class "
                                        r"indices 0 to 1 \(num_classes=2; 1 such items\)"):
        ssl_ema.train(None, out, train_set=Items(images, [1, -1, 0]), test_set=ok)
    with pytest.raises(DataError, match=r"^test_set\[2\] has label 2, outside the class "
                                        r"indices 0 to 1 \(num_classes=2"):
        ssl_ema.train(None, out, train_set=ok, test_set=Items(images, [0, 1, 2]))
    named = Items(images, [0, 1, 0])
    named.targets = ["cat", "dog", "cat"]  # class names where the labels are looked up
    with pytest.raises(DataError, match="^Items: labels must be integer class indices"):
        ssl_ema.train(None, out, train_set=named, test_set=ok)
    assert not any(tmp_path.iterdir())


def test_a_backbone_name_is_a_timm_model_and_anything_else_one_line(tmp_path: Path) -> None:
    out = [f"run.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="^model.backbone: unknown timm model 'resnet19'"):
        ssl_ema.train(None, out, backbone="resnet19")
    with pytest.raises(ConfigError, match="^num_features=8 goes with a backbone module; the "
                                          "timm model 'resnet18' has its own"):
        ssl_ema.train(None, out, backbone="resnet18", num_features=8)
    with pytest.raises(ConfigError, match="^backbone: expected an nn.Module, a function "
                                          "returning one or a timm model name, got int"):
        backbone_builder(3, 3, 8)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_backbone_builder_checks_and_copies() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    build = backbone_builder(net, in_chans=3, image_size=8, num_features=4)
    student, teacher = build(), build()
    assert student is net and teacher is not net and teacher.num_features == 4
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                  teacher.state_dict().values()))
    assert net.training and int(net[1].num_batches_tracked) == 0  # the check left BN alone
    fresh = backbone_builder(lambda: nn.Sequential(nn.Flatten()), 3, 2, num_features=12)
    assert fresh() is not fresh()
    assert net.num_features == 4  # set on the caller's module: what the heads read
    with pytest.raises(ConfigError, match="has no integer num_features; pass num_features="):
        backbone_builder(nn.Sequential(nn.Flatten()), 3, 8)
    with pytest.raises(ConfigError, match="num_features=5 but backbone Sequential says "
                                          "num_features=4"):
        backbone_builder(net, 3, 8, num_features=5)
    del net.num_features
    with pytest.raises(ConfigError, match=r"returns \(2, 4\) for 2 images.*num_features=5"):
        backbone_builder(net, 3, 8, num_features=5)
    with pytest.raises(ConfigError, match="fails on images of shape"):
        backbone_builder(nn.Linear(7, 2), 3, 8, num_features=2)
    with pytest.raises(ConfigError, match="expected an nn.Module"):
        backbone_builder(lambda: 3, 3, 8)  # type: ignore[arg-type, return-value]


def test_cli_resume_refuses_a_run_of_given_objects(tmp_path: Path) -> None:
    (tmp_path / "header.json").write_text(json.dumps({"given": {"backbone": "my.Net"}}))
    with pytest.raises(ConfigError, match=r"objects given from Python \(backbone\); resume it "
                                          r"from Python"):
        refuse_given(tmp_path)
    (tmp_path / "header.json").write_text(json.dumps({"git": "abc"}))
    refuse_given(tmp_path)  # a recipe's run: resumable from the command line


@pytest.mark.slow  # trains 4 steps, then 2 again (resumed)
def test_doc_example_trains_on_the_given_objects(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(doc_blocks()[0], ns)
    run = ns["run"]
    assert run.run_dir.parent == Path("runs/stripes")
    assert json.loads((run.run_dir / "results.json").read_text()) == run.results
    assert (run.run_dir / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").open()]
    header = records[0]
    assert header["given"] == {"train_set": "builtins.Stripes", "test_set": "builtins.Stripes",
                               "backbone": "torch.nn.modules.container.Sequential"}
    assert header["kappa"] == 0.25 and header["train_images"] == 128
    written = (run.run_dir / "config.yaml").read_text()
    assert "  dataset: given\n" in written and "  backbone: given\n" in written
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:  # the EMA Scaling Rule: the per-step momentum ** kappa
        assert r["momentum"] == pytest.approx(r["momentum_base"] ** 0.25)
    assert run.results["knn_random_bn"] == 1.0  # the doc says so of its toy task
    final = [r for r in records if r["event"] == "eval"][-1]
    assert final["knn_teacher"] == run.results["knn_teacher"]
    # The student is the caller's module, trained; the teacher an EMA copy that lags it.
    assert run.student is ns["backbone"] and run.teacher is not run.student
    lag = [float((t - s).detach().abs().max()) for t, s in zip(run.teacher.parameters(),
                                                      run.student.parameters())]
    assert max(lag) > 0
    # Resumed from its step-2 checkpoint with the same objects, the run ends bit for bit where
    # the uninterrupted one did.
    done = {k: v.clone() for k, v in run.trainer.model.state_dict().items()}
    again = ssl_ema.train(ns["recipe"], resume=run.run_dir / "checkpoints" / "step_00000002",
                          train_set=ns["Stripes"](128, seed=0),
                          test_set=ns["Stripes"](64, seed=1), backbone=ns["backbone"],
                          num_features=16)
    assert again.run_dir == run.run_dir and again.student is ns["backbone"]
    resumed = again.trainer.model.state_dict()
    assert resumed.keys() == done.keys()
    assert all(torch.equal(resumed[k], done[k]) for k in done)
    # The doc's "teacher later" block loads the checkpoint's teacher into the caller's module;
    # the tools refuse the run in one line.
    teacher = {k: v.clone() for k, v in again.teacher.state_dict().items()}
    exec(doc_blocks()[1], ns)
    assert all(torch.equal(v, ns["backbone"].state_dict()[k]) for k, v in teacher.items())
    with pytest.raises(ConfigError, match="trained a backbone given from Python"):
        load_run(again.run_dir)


@pytest.mark.slow  # trains 3 tiny steps
def test_a_timm_name_as_backbone_trains_as_the_recipe_would(tmp_path: Path) -> None:

    recipe = [o for o in TINY if not o.startswith("model.backbone=")]
    run = ssl_ema.train(None, [*recipe, f"run.output_dir={tmp_path}"], backbone="test_resnet")
    assert run.results["step"] == 3
    assert "  backbone: test_resnet\n" in (run.run_dir / "config.yaml").read_text()
    assert "given" not in json.loads((run.run_dir / "header.json").read_text())
    assert type(run.teacher).__name__ == "ResNet"  # timm's, built from the name


@pytest.mark.parametrize(("key", "argument"), [("data.dataset", "train_set="),
                                               ("model.backbone", "backbone=")])
def test_a_recipe_run_cannot_name_given_objects(tmp_path: Path, key: str, argument: str) -> None:
    """tools/train.py (prepare_run) refuses before any folder exists; only Python passes them."""
    from ssl_ema.engine.run import prepare_run

    with pytest.raises(ConfigError, match=rf"^{key}=given: set by ssl_ema.train\({argument}"):
        prepare_run(None, [f"{key}=given", f"run.output_dir={tmp_path / 'runs'}"], None)
    assert not (tmp_path / "runs").exists()
