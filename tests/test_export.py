"""Export -> load round trips exactly, through timm and through ssl_ema's loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ssl_ema.config import ConfigError
from ssl_ema.models.backbones import build_backbone
from ssl_ema.models.export import export_backbone, load_backbone, read_metadata


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter and BatchNorm statistic so a fresh init cannot pass for it."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.1 * torch.rand(t.shape, generator=g)).abs_()
            else:
                t.fill_(7)  # num_batches_tracked
    return model.eval()


def assert_identical(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_timm_loads_an_exported_backbone_exactly(tmp_path: Path) -> None:
    kw = {"name": "resnet10t", "in_chans": 1, "image_size": 16, "cifar_stem": False}
    model = trained_like(build_backbone(**kw))
    path = tmp_path / "teacher.safetensors"
    meta = export_backbone(model, path, **kw)
    assert read_metadata(path)["timm_loadable"] is True
    # The documented call (README, tools/export.py), with the kwargs the file records:
    loaded = timm.create_model(meta["timm_model"], pretrained=True,
                               pretrained_cfg_overlay={"file": str(path)},
                               **read_metadata(path)["timm_kwargs"])
    x = torch.randn(3, 1, 16, 16)
    assert_identical(model, loaded, x)
    assert_identical(model, load_backbone(path), x)


def test_cifar_stem_loads_through_ssl_ema_only(tmp_path: Path) -> None:
    kw = {"name": "resnet18", "in_chans": 3, "image_size": 32, "cifar_stem": True}
    model = trained_like(build_backbone(**kw))
    path = tmp_path / "cifar.safetensors"
    export_backbone(model, path, **kw)
    meta = read_metadata(path)
    assert meta["timm_loadable"] is False and meta["build_kwargs"]["cifar_stem"] is True
    assert_identical(model, load_backbone(path), torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="conv1.weight"):  # timm's 7x7 stem: shape mismatch
        timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                          **meta["timm_kwargs"])


def test_export_refuses_a_wrong_recipe_and_loads_refuse_other_files(tmp_path: Path) -> None:
    model = build_backbone("resnet10t", in_chans=1)
    with pytest.raises(ConfigError, match="does not match its recorded recipe"):
        export_backbone(model, tmp_path / "x.safetensors", name="resnet10t", in_chans=3,
                        image_size=16, cifar_stem=False)
    assert not (tmp_path / "x.safetensors").exists()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConfigError, match="not an ssl_ema backbone export"):
        load_backbone(tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone(tmp_path / "missing.safetensors")


def test_a_backbone_without_stem_relu_reloads_without_it(tmp_path: Path) -> None:
    """The ReLU has no weights, so the file's recipe must say it is gone (lightly's layout)."""
    kw = {"name": "resnet10t", "in_chans": 1, "image_size": 16, "cifar_stem": False}
    model = build_backbone(**kw, stem_activation=False).eval()
    with torch.no_grad():  # signed weights (trained_like's are positive: every ReLU a no-op)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    path = tmp_path / "no_relu.safetensors"
    export_backbone(model, path, **kw, stem_activation=False)
    meta = read_metadata(path)
    assert meta["build_kwargs"]["stem_activation"] is False and meta["timm_loadable"] is False
    x = torch.randn(3, 1, 16, 16)
    assert_identical(model, load_backbone(path), x)
    with_relu = build_backbone(**kw).eval()
    with_relu.load_state_dict(model.state_dict())
    assert not torch.equal(with_relu(x), model(x))  # so the recorded flag is what keeps it exact
