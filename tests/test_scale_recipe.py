"""tools/scale_recipe.py: a recipe restated at another batch resolves to the same values."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_ema.config import dump_yaml, load_config
from ssl_ema.engine.scaled import resolve
from tests.helpers import ROOT, load_tool

RECIPE = ROOT / "recipes" / "byol_r18.yaml"
# In process: the tool's main() is what its command line runs (sys.exit(main())), and a
# subprocess would spend seconds importing torch for each call.
scale_recipe = load_tool("scale_recipe")


def scale(tmp_path: Path, recipe: Path, batch: int) -> Path:
    out = tmp_path / f"scaled_{batch}.yaml"
    assert scale_recipe.main([str(recipe), "--batch-size", str(batch), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_rescaled_recipe_resolves_to_the_same_hyperparameters(
    tmp_path: Path, optimizer: str
) -> None:
    overrides = [f"optim.name={optimizer}", "ema.extra_momenta=[0.999]"]
    src = tmp_path / "src.yaml"
    src.write_text(dump_yaml(load_config(RECIPE, overrides)))
    out = scale(tmp_path, src, 2048)
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
        assert rb.momentum.per_update(mb, 0).value == \
            pytest.approx(ra.momentum.per_update(ma, 0).value)
    assert b.method.momentum == pytest.approx(0.99**4)


def test_refuses_to_overwrite_and_bad_batch(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "keep.yaml"
    existing.write_text("precious\n")
    for extra in (["--batch-size", "1024", "--out", str(existing)], ["--batch-size", "-4"]):
        assert scale_recipe.main([str(RECIPE), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert existing.read_text() == "precious\n"
