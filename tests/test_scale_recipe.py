"""tools/scale_recipe.py: a recipe restated at another batch resolves to the same values."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ssl_ema.config import dump_yaml, load_config
from ssl_ema.engine.scaled import resolve
from tests.conftest import ROOT, python

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

RECIPE = ROOT / "recipes" / "byol_r18.yaml"


def scale(tmp_path: Path, env: dict[str, str], recipe: Path, batch: int) -> Path:
    out = tmp_path / f"scaled_{batch}.yaml"
    proc = subprocess.run([python(), str(ROOT / "tools" / "scale_recipe.py"), str(recipe),
                           "--batch-size", str(batch), "--out", str(out)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_rescaled_recipe_resolves_to_the_same_hyperparameters(
    tmp_path: Path, tools_env: dict[str, str], optimizer: str
) -> None:
    overrides = [f"optim.name={optimizer}", "ema.extra_momenta=[0.999]"]
    src = tmp_path / "src.yaml"
    src.write_text(dump_yaml(load_config(RECIPE, overrides)))
    out = scale(tmp_path, tools_env, src, 2048)
    a, b = load_config(src), load_config(out)
    assert b.scaling.reference_batch == 2048 and b.train.batch_size == 2048
    ra, rb = resolve(a, 2048), resolve(b, 2048)
    assert ra.kappa == 4 and rb.kappa == 1
    assert rb.optimizer.lr.value == pytest.approx(ra.optimizer.lr.value)
    if optimizer == "adamw":
        assert ra.optimizer.betas is not None and rb.optimizer.betas is not None
        for x, y in zip(ra.optimizer.betas, rb.optimizer.betas):
            assert y.value == pytest.approx(x.value)
        assert rb.optimizer.eps is not None and ra.optimizer.eps is not None
        assert rb.optimizer.eps.value == pytest.approx(ra.optimizer.eps.value)
    # The momenta of one EMA update agree: rho ** 4 stated once vs applied at kappa 4.
    for ma, mb in [(a.method.momentum, b.method.momentum),
                   (a.ema.extra_momenta[0], b.ema.extra_momenta[0])]:
        assert rb.update_momentum(mb, 0) == pytest.approx(ra.update_momentum(ma, 0))
    assert b.method.momentum == pytest.approx(0.99**4)


def test_refuses_to_overwrite_and_bad_batch(tmp_path: Path, tools_env: dict[str, str]) -> None:
    existing = tmp_path / "keep.yaml"
    existing.write_text("precious\n")
    for extra in (["--batch-size", "1024", "--out", str(existing)], ["--batch-size", "-4"]):
        proc = subprocess.run([python(), str(ROOT / "tools" / "scale_recipe.py"), str(RECIPE),
                               *extra], env=tools_env, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ")
        assert len(proc.stderr.strip().splitlines()) == 1
    assert existing.read_text() == "precious\n"
