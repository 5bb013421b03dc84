"""model.init (timm's vs PyTorch's layer init) and optim.decay_norm_bias: the two differences
between our BYOL recipe and lightly's CIFAR-10 benchmark left to measure (docs/RESULTS.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_ema.config import ConfigError, OptimConfig, load_config
from ssl_ema.engine.optim import build_optimizer, param_groups
from ssl_ema.methods.byol import BYOL
from ssl_ema.models.backbones import build_backbone
from tests.helpers import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def conv_std(conv: nn.Conv2d) -> float:
    return float(conv.weight.detach().std())


def test_timm_init_is_kaiming_fan_out_with_zeroed_last_norm() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", cifar_stem=True, init="timm")
    conv = model.layer3[1].conv1  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv_std(conv) == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.01)
    for block in [*model.layer1, *model.layer4]:
        assert torch.count_nonzero(block.bn2.weight) == 0  # each residual branch starts at 0
        assert torch.all(block.bn1.weight == 1)


def test_torch_init_is_pytorch_layer_defaults() -> None:
    """Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in),
    2.45x smaller than timm's; every BatchNorm weight 1, the CIFAR stem untouched in kind."""
    torch.manual_seed(0)
    model = build_backbone("resnet18", cifar_stem=True, init="torch")
    conv = model.layer3[1].conv1
    fan_in = 256 * 9
    assert conv_std(conv) == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.01)
    assert float(conv.weight.detach().abs().max()) <= 1 / math.sqrt(fan_in)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    with pytest.raises(ConfigError, match="model.init"):
        build_backbone("resnet18", init="lightly")


def test_method_builds_teacher_equal_to_student_under_torch_init() -> None:
    cfg = load_config(QUICKSTART, ["model.init=torch"])
    torch.manual_seed(0)
    method = BYOL(cfg, in_chans=1)
    student, teacher = method.student["backbone"], method.teacher["backbone"]
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                  teacher.state_dict().values()))
    torch.manual_seed(0)
    timm_init = BYOL(load_config(QUICKSTART), in_chans=1)
    # Different init, same architecture: the same parameter shapes, other values.
    a = dict(timm_init.student["backbone"].named_parameters())
    b = dict(student.named_parameters())
    assert a.keys() == b.keys() and not torch.equal(a["layer1.0.bn2.weight"],
                                                    b["layer1.0.bn2.weight"])


@pytest.mark.parametrize("decay_norm_bias", [False, True])
def test_weight_decay_groups(decay_norm_bias: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen parameters are left out of both groups
    groups = param_groups(model, 0.1, decay_norm_bias)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    ids = {name: id(p) for name, p in model.named_parameters()}
    assert ids["3.weight"] in decayed and ids["0.weight"] not in decayed
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert (ids[name] in decayed) is decay_norm_bias
    assert sum(len(g["params"]) for g in groups) == 5  # no parameter twice, no empty group
    assert all(g["params"] for g in groups) and groups[0]["decay"] is True

    # The optimizer really decays what the groups say: zero gradients, one SGD step.
    opt = build_optimizer(model, OptimConfig(name="sgd", weight_decay=0.1, momentum=0.0,
                                             decay_norm_bias=decay_norm_bias), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["3.weight"], 0.9 * before["3.weight"])
    assert torch.equal(after["1.weight"], before["1.weight"]) is not decay_norm_bias
