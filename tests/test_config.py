from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from ssl_ema.config import ConfigError, load_config, parse_overrides
from tests.helpers import ROOT, python


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_recipe_name(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "method:\n  name: byol\ntrain:\n  epochs: 3\n"))
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 512  # default untouched
    assert cfg.run.name == "r"  # recipe stem


def test_overrides_are_typed() -> None:
    tree = parse_overrides(["train.epochs=5", "optim.lr=0.1", "data.download=false",
                            "optim.betas=[0.9,0.95]"])
    assert tree == {"train": {"epochs": 5}, "optim": {"lr": 0.1, "betas": [0.9, 0.95]},
                    "data": {"download": False}}
    cfg = load_config(None, ["optim.lr=1", "optim.betas=[0.9,0.95]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown key 'train.epoch'; valid keys here: epochs, batch_size"),
        (["trian.epochs=3"], "unknown key 'trian'; valid keys here: run, data, model"),
        (["train.epochs=three"], "train.epochs: expected an integer, got 'three'"),
        (["train.epochs=2.5"], "train.epochs: expected an integer, got 2.5"),
        (["data.download=maybe"], "data.download: expected true or false"),
        (["method.name=simclr"], "method.name: unknown value 'simclr'; valid: byol"),
        (["data.dataset=mnist"], "valid: digits, cifar10, cifar100, imagefolder"),
        (["model.backbone=resnet19"], "model.backbone: unknown timm model 'resnet19'"),
        (["train.mixed_precision=fp8"], "valid: no, bf16, fp16"),
        (["method.momentum=1.5"], "method.momentum: a momentum must lie in [0, 1]"),
        (["train.batch_size=10", "train.grad_accumulation=4"], "not divisible"),
        (["ema.extra_momenta=[0.99, 2]"], "ema.extra_momenta[1]: a momentum must lie in [0, 1]"),
        (["ema.extra_momenta=0.99"], "ema.extra_momenta: expected a list, got 0.99"),
        (["ema.buffers=ema"], "ema.buffers: invalid value 'ema'; valid: own, copy, average"),
        (["ema.period=0"], "ema.period: must be positive"),
        (["scaling.rule=sqrt"], "valid: ema, optimizer, none"),
        (["train.epochs=10", "train.batch_schedule=[[20, 512]]"],
         "train.batch_schedule[0]: epoch 20 must be after 0 and before train.epochs 10"),
        (["train.batch_schedule=[[5, 512], [3, 1024]]"], "epoch 3 must be after 5"),
        (["train.grad_accumulation=2", "train.batch_schedule=[[5, 511]]"],
         "train.batch_schedule[0]: batch 511 is not divisible by train.grad_accumulation 2"),
        (["train.batch_schedule=[[5]]"], "train.batch_schedule[0]: expected a list of 2 values"),
        (["train.epochs"], "not of the form key.sub=value"),
        (["method.name=dino", "data.dataset=cifar10", "data.views=simclr"],
         "data.views=simclr: chooses BYOL's view pair; method dino makes its own views"),
        (["data.normalize=imagenet"], "data.normalize: applies to RGB images"),
        (["data.dataset=cifar10", "data.views=simclr", "data.jitter_strength=0"],
         "data.jitter_strength: must be positive"),
        (["method.name=dino", "dino.head_layers=0"], "dino.head_layers: must be positive"),
    ],
)
def test_bad_input_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n"))
    with pytest.raises(ConfigError, match=r"r.yaml' is not valid YAML at line 4, column 3: key "
                                          r"'lr' appears twice \(lines 3 and 4\)"):
        load_config(write(tmp_path, "optim:\n  name: sgd\n  lr: 0.1\n  lr: 0.2\n"))
    with pytest.raises(ConfigError, match="the value is not valid YAML.*'a' appears twice"):
        load_config(None, ["optim.betas={a: 1, a: 2}"])
    # Merge keys may be overridden: that is what they are for.
    merged = write(tmp_path, "method: {name: byol}\noptim:\n  <<: {name: sgd, lr: 0.1}\n"
                             "  lr: 0.2\n")
    assert load_config(merged).optim.lr == 0.2
    # A safe loader: python tags are rejected, not executed.
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: !!python/object/apply:os.system ['true']\n"))


@pytest.mark.slow
def test_train_cli_exits_2_before_building_anything(tmp_path: Path, tools_env) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(
        [python(), str(ROOT / "tools" / "train.py"), str(ROOT / "recipes" / "quickstart.yaml"),
         f"run.output_dir={out}", "model.backbone=resnet19"],
        capture_output=True, text=True, env=tools_env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.backbone: unknown timm")
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_valid(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.run.name == recipe.stem


def test_yaml_no_is_the_string_no_where_a_choice_is_expected() -> None:
    # YAML 1.1 reads a bare `no` as false; `mixed_precision: no` must still mean "no".
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    # YAML 1.1 reads `1e-3` as a string; a float field must still take it.
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_a_nan_string_is_not_a_number() -> None:
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'nan'"):
        load_config(None, ["optim.lr=nan"])


def test_configs_of_older_runs_load_resume_and_match(tmp_path: Path) -> None:
    """Older config.yaml files hold every method's section and BYOL's heads under method:;
    they load (the heads moved to byol:), resume (check_same_run) and match stored results."""
    from ssl_ema.config import from_dict, to_dict
    from ssl_ema.engine.run import check_same_run, config_changes, flatten
    from ssl_ema.methods.byol_spec import BYOLConfig
    from ssl_ema.methods.registry import sections

    cfg = load_config(ROOT / "recipes" / "quickstart.yaml")
    old = to_dict(cfg)
    old["method"].update(old.pop("byol"))  # BYOL's heads where they were
    old.update({key: {} for key in sections() if key != "byol"})  # every method's section
    assert "projection_dim" in old["method"] and "dino" in old
    again = from_dict(old)
    assert again == cfg and again.section(BYOLConfig).projection_dim == 128
    assert config_changes(flatten(old), cfg, set()) == []
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    check_same_run(run_dir, cfg)
    changed = load_config(ROOT / "recipes" / "quickstart.yaml", ["byol.projection_dim=64"])
    with pytest.raises(ConfigError, match="byol.projection_dim: 128 -> 64"):
        check_same_run(run_dir, changed)
    with pytest.raises(ConfigError, match="method.projection_dim and byol.projection_dim"):
        load_config(ROOT / "recipes" / "quickstart.yaml", ["method.projection_dim=64"])
    # An older recipe's heads under method: still load, into byol:.
    assert load_config(None, ["method.projection_dim=64"]).section(BYOLConfig).projection_dim \
        == 64
