"""No silent acceptance: input that would train something else than asked is one line, exit 2,
before any work, and a start that fails leaves no run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_ema.config import ConfigError, load_config
from ssl_ema.engine.launch import train
from tests.test_data import tiny_imagefolder

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

QUICK = ["model.backbone=test_resnet", "data.eval_subset=16", "eval.knn_k=5",
         "train.max_steps=1", "eval.every_epochs=0"]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty; a recipe names at least its method"),
    ("# only a comment\n", "is empty"),
    ("train:\n  epochs: 3\n", "names no method; add method.name (one of byol, dino"),
    ("train:\n  epochs: 3\n  batch_size: [1, 2\n", "not valid YAML at line 4, column 1: "),
    ("method:\n  name: byol\n   lr: 1\n", "not valid YAML at line 3, column 6: mapping values"),
    # PyYAML would keep the second section silently: 2 epochs, the batch of 16 dropped.
    ("method:\n  name: byol\ntrain:\n  batch_size: 16\neval:\n  knn_k: 5\ntrain:\n  epochs: 2\n",
     "not valid YAML at line 7, column 1: key 'train' appears twice (lines 3 and 7), the second "
     "would replace the first; keep one"),
    ("method:\n  name: byol\n  name: dino\n", "key 'name' appears twice (lines 2 and 3)"),
    ("method:\n  name: byol\n# caf\xe9 au lait\n".encode("latin-1"),
     "is not UTF-8 text: byte 0xe9 at offset 26 (line 3); save the file as UTF-8"),
])
def test_recipes_that_name_nothing_or_do_not_parse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, message: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    # A recipe accepted by mistake trains test_resnet for one step, not ResNet-18 for epochs.
    assert train(str(recipe), [f"run.output_dir={tmp_path / 'runs'}", *QUICK]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_override_that_does_not_parse() -> None:
    with pytest.raises(ConfigError, match="override 'optim.betas=.0.9': the value is not valid"):
        load_config(None, ["optim.betas=[0.9"])


def test_one_class_is_refused_and_leaves_no_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tiny_imagefolder(tmp_path / "imgs")
    for split in ("train", "test"):
        for image in (root / split / "class1").iterdir():
            image.unlink()
        (root / split / "class1").rmdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    out = tmp_path / "runs"
    assert train(str(recipe), [f"run.output_dir={out}", "data.dataset=imagefolder",
                               f"data.root={root}", "data.image_size=8"]) == 2
    assert "has 1 class folder; the labelled evaluation (kNN, top-1) needs at least 2" in (
        one_line_error(capsys))
    assert not out.exists()  # the run folder the lock had made is gone, and its parent


def test_a_multi_process_request_that_starts_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What `accelerate launch --cpu --num_processes 2` hands its single process.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    assert train(str(recipe), [f"run.output_dir={tmp_path / 'runs'}"]) == 2
    assert "asked for several processes but started one" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_output_directory(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    assert train(str(recipe), [f"run.output_dir={tmp_path / 'file' / 'runs'}"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"error: cannot create the run directory {tmp_path / 'file'}/runs/r/")
    assert line.endswith("set run.output_dir to a writable folder")
