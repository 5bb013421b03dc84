"""The method registry: everything that lists methods derives from it, so a new method gets these
generic checks for free (import cycles and what may import what: test_imports.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_ema.config import CHOICES, CLASSIFICATION_METHODS, ConfigError, load_config
from ssl_ema.engine.loaders import build_run_data
from ssl_ema.methods import METHODS, TeacherStudentMethod, build_method
from ssl_ema.methods.registry import method_data
from tests.helpers import TINY

# The shared tiny run (tests/helpers.py), at batch 4: the generic checks build every method in a
# second or two.
SMALL = [*TINY, "train.batch_size=4", "labels.per_class=8", "pseudo_label.mu=2"]


def test_choices_and_checks_derive_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CHOICES["method.name"] == tuple(METHODS)
    assert set(CLASSIFICATION_METHODS) == {n for n, s in METHODS.items() if s.labels != "none"}
    device = [n for n, s in METHODS.items() if s.device_views is not None or s.device_classify]
    assert {"byol", "dino", "moco", "supervised", "pseudo_label"} <= set(device)
    load_config(None, ["data.dataset=cifar10", "data.pipeline=device", "method.name=supervised"])
    # A method registered without device views is refused on the device pipeline.
    monkeypatch.setitem(METHODS, "supervised",
                        dataclasses.replace(METHODS["supervised"], device_classify=False))
    others = ", ".join(n for n in device if n != "supervised")
    with pytest.raises(ConfigError, match=f"makes the views of {others}; "
                                          "method.name=supervised uses data.pipeline=loader"):
        load_config(None, ["data.dataset=cifar10", "data.pipeline=device",
                           "method.name=supervised"])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_on_its_own_batches(name: str) -> None:
    """The batch contract (ssl_ema/data/batch.py): the registered views of each method, collated
    by the loader, go through the method's forward to a finite loss with a graph."""
    spec = METHODS[name]
    labels = [] if spec.labels != "none" else ["labels.per_class=0"]
    cfg = load_config(None, [*SMALL, *labels, f"method.name={name}", *spec.tiny_overrides])
    data = build_run_data(cfg)
    method = build_method(cfg, data.in_chans, data.num_classes)
    batch = next(iter(DataLoader(data.train, batch_size=4)))
    out = method(batch)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert set(method.teacher) <= set(method.student)
    assert method.evaluation == spec.evaluation in ("knn", "classify")
    # One momentum schedule, in the base class: no method redefines it.
    assert "momentum" not in vars(type(method)) and isinstance(method, TeacherStudentMethod)
    assert method.momentum(0.5) == pytest.approx(0.5 * (cfg.method.momentum + 1.0))


def test_byol_with_a_vit_honours_patch_size() -> None:
    cfg = load_config(None, ["method.name=byol", "model.backbone=test_vit",
                             "model.cifar_stem=false", "model.patch_size=4",
                             "data.image_size=16"])
    method = build_method(cfg, in_chans=1)
    for role in (method.student, method.teacher):
        assert role["backbone"].patch_embed.patch_size == (4, 4)
    x = torch.randn(2, 1, 16, 16)
    assert role["backbone"].forward_features(x).shape[1] == 16 + 1  # (16/4)^2 patches + class


def test_every_method_section_is_registered_in_its_own_file() -> None:
    """Config's own fields are the sections every run shares; each method's keys are its own
    dataclass, in its spec, read with cfg.section, and a run's config.yaml holds its own
    method's section only (the others are checked, then left out)."""
    from ssl_ema.config import Config, to_dict
    from ssl_ema.methods.registry import sections

    shared = {f.name for f in dataclasses.fields(Config)}
    for name, spec in METHODS.items():
        if spec.section is not None:
            assert spec.section.__module__ == f"ssl_ema.methods.{name}_spec"
            assert spec.key not in shared
    assert {"byol", "dino", "moco", "supervised", "pseudo_label"} <= set(sections())
    cfg = load_config(None, ["method.name=dino", "dino.output_dim=64", "pseudo_label.mu=3"])
    dino, pseudo_label = (sections()[k] for k in ("dino", "pseudo_label"))
    assert cfg.section(dino).output_dim == 64 and cfg.section(pseudo_label).mu == 7  # its default
    tree = to_dict(cfg)
    assert tree["dino"]["output_dim"] == 64
    assert not {"byol", "moco", "supervised", "pseudo_label"} & set(tree)
    with pytest.raises(ConfigError, match="unknown key 'moco.queu'"):
        load_config(None, ["method.name=dino", "moco.queu=3"])
    # The data code gets mu and the strong views from the engine (the method's, looked up once),
    # not from its section.
    unlabelled = method_data(load_config(None, ["method.name=pseudo_label", "labels.per_class=4",
                                                "pseudo_label.mu=3"])).unlabelled
    assert unlabelled is not None and unlabelled.mu == 3


def test_a_semi_supervised_method_must_say_how_it_sees_unlabelled_images() -> None:
    from ssl_ema.methods.registry import register

    spec = dataclasses.replace(METHODS["pseudo_label"], name="fixmatch_copy", unlabelled=None,
                               section=None)
    with pytest.raises(ValueError, match="labels='semi' and unlabelled go together"):
        register(spec)
