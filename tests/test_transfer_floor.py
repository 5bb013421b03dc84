"""The fair floor on downstream data (tools/transfer.py), on tiny data on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from ssl_ema.eval.transfer import floor_on, load_downstream, prepare
from ssl_ema.models.backbones import build_backbone
from ssl_ema.models.export import export_backbone
from tests.helpers import load_tool

BUILD = {"name": "test_resnet", "in_chans": 1, "image_size": 8, "cifar_stem": False,
         "patch_size": 0}


def _tool() -> ModuleType:
    return load_tool("transfer")


def test_the_floor_holds_the_training_images_statistics_and_leaves_the_original() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    random = nn.Sequential(conv, nn.BatchNorm2d(4), nn.Flatten())
    data = prepare(load_downstream("digits"), in_chans=1, image_size=8, subset=100)
    floor = floor_on(random, data)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])  # type: ignore[arg-type]
    with torch.no_grad():
        out = conv(images)  # one batch of 100: the statistics are this batch's
    bn = floor[1]
    assert torch.allclose(bn.running_mean, out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, out.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert torch.equal(random[1].running_mean, torch.zeros(4))  # the random twin untouched
    assert torch.equal(floor[0].weight, conv.weight)  # same weights: only statistics differ


@pytest.mark.slow  # the tool end to end (its time: docs/RESULTS.md, "Test suite")
def test_an_export_of_the_floor_scores_as_the_floor(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The tool's floor for an export is built with seed 0 by the export's own builder and
    normalised on the downstream training images: exporting exactly that network and scoring
    it gives the floor's numbers, so both rows of the table are what they say."""
    torch.manual_seed(0)
    random = build_backbone(**BUILD)  # type: ignore[arg-type]
    floor = floor_on(random, prepare(load_downstream("digits"), in_chans=1, image_size=8,
                                     subset=120))
    path = tmp_path / "floor.safetensors"
    export_backbone(floor, path, name="test_resnet", in_chans=1, image_size=8, cifar_stem=False)
    out = tmp_path / "t.json"
    assert _tool().main([str(path), "--datasets", "digits", "--subset", "120", "--k", "5",
                         "--protocols", "knn", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    models = doc["results"]["digits"]["models"]
    assert list(models) == ["export", "random, BN recomputed"] and doc["floor"] is True
    assert models["export"]["knn"]["accuracy"] == models["random, BN recomputed"]["knn"]["accuracy"]
    assert 0.3 < models["export"]["knn"]["accuracy"] < 1  # 10 classes: above chance
    table = capsys.readouterr().out
    assert "digits          export" in table and "random, BN recomputed" in table


def test_roles_with_an_export_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b.safetensors"
    export_backbone(build_backbone(**BUILD), path, name="test_resnet", in_chans=1,  # type: ignore[arg-type]
                    image_size=8, cifar_stem=False)
    assert _tool().main([str(path), "--roles", "student"]) == 2
    err = capsys.readouterr().err
    assert "holding one backbone; --roles applies to run directories" in err
    assert err.count("\n") == 1
