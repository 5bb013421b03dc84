"""No silent acceptance: input that would train something else than asked is one line, exit 2,
before any work, and a start that fails leaves no run folder."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ssl_ema.config import ConfigError, load_config
from ssl_ema.engine.launch import train
from tests.helpers import ROOT, cut_jpeg_folder, one_line_error, python, tiny_imagefolder

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

QUICK = ["model.backbone=test_resnet", "model.cifar_stem=false", "data.eval_subset=16",
         "eval.knn_k=5", "train.max_steps=1", "eval.every_epochs=0"]


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


@pytest.mark.parametrize(("overrides", "message"), [
    # Accelerate runs fp32 on the CPU when asked for fp16 (no autocast, no scaler there).
    (["train.mixed_precision=fp16"], "train.mixed_precision=fp16: Accelerate has no fp16 "
     "autocast on the CPU and would train in fp32; set it to bf16 (CPU autocast) or no"),
    # k above the bank: every query would vote over all 1,437 digits (kNN 0.52, not 0.74).
    (["data.eval_subset=0", "eval.knn_k=100000"], "eval.knn_k=100000 is more than the 1437 "
     "training images of the kNN bank; set eval.knn_k to at most 1437"),
    (["eval.knn_k=17"], "eval.knn_k=17 is more than the 16 training images of the kNN bank "
     "(data.eval_subset=16)"),
])
def test_what_would_train_or_score_otherwise_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    assert train(str(recipe), [f"run.output_dir={tmp_path / 'runs'}", *QUICK, *overrides]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_runs_started_in_the_same_second_get_a_folder_each(tmp_path: Path,
                                                           tools_env: dict[str, str]) -> None:
    """Two real processes start the same recipe at once, as a sweep's seeds do: the second
    used to get the first one's folder (a timestamp to the second) and be refused."""
    recipe, go = tmp_path / "r.yaml", tmp_path / "go"
    recipe.write_text("method:\n  name: byol\n")
    out = tmp_path / "runs"
    workers = [subprocess.Popen(
        [python(), str(ROOT / "tests" / "start_worker.py"), str(go), str(recipe),
         f"run.output_dir={out}", f"run.seed={seed}", *QUICK], env=tools_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.02 - time.time() % 1)  # both start 20 ms into one second
    go.touch()
    results = [(w.wait(timeout=300), *w.communicate()) for w in workers]
    for code, _, err in results:
        assert code == 0, err[-2000:]
    folders = sorted(p.name for p in (out / "r").iterdir())
    assert len(folders) == 2 and folders[1] == f"{folders[0]}-2", folders
    seeds = {yaml.safe_load((out / "r" / f / "config.yaml").read_text())["run"]["seed"]
             for f in folders}
    assert seeds == {0, 1}  # each run in its own folder, whole
    assert all((out / "r" / f / "results.json").is_file() for f in folders)


def test_a_cut_jpeg_met_while_training_is_bad_data_not_a_full_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut, base = cut_jpeg_folder(tmp_path / "imgs")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    # The evaluation before training reads every training image, in a loader worker.
    code = train(str(recipe), [f"run.output_dir={tmp_path / 'runs'}", *QUICK, *base,
                               "data.corrupt=trust", "data.num_workers=1", "train.batch_size=4",
                               "scaling.reference_batch=4", "eval.knn_k=2"])
    line = one_line_error(capsys)
    assert code == 2
    assert line.startswith(f"error: '{cut}' is not a readable image (image file is truncated")
    assert "data.corrupt=" in line and "free space" not in line
