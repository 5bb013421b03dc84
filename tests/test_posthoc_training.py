"""The post-hoc EMA inside the trainer and tools/posthoc_ema.py, on tiny CPU runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_ema.config import ConfigError, load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.posthoc import FOLDER, STATE_FILE
from ssl_ema.engine.trainer import Trainer
from ssl_ema.models.export import load_backbone
from ssl_ema.posthoc import list_snapshots, read_snapshot, reconstruct, solve_reconstruction
from tests.helpers import METHOD_TINY, ROOT, TINY, load_tool, resume_from, run

pytestmark = pytest.mark.slow  # trains through the real trainer

POSTHOC = "ema.posthoc.sigma_rels=[0.05, 0.1]"


def snapshot_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / FOLDER).glob("*.safetensors"))}


def test_a_resumed_run_writes_the_same_snapshots_and_averages(tmp_path: Path) -> None:
    """BYOL (a predictor the teacher lacks: the power EMAs average the teacher's modules of the
    student), stopped at step 3 of 6, resumed: snapshots and averages bit for bit; the state is
    in the checkpoint's manifest; the final snapshot is the tracked average itself."""
    steps = ["train.max_steps=6", "train.batch_size=32", "train.grad_accumulation=1",
             "train.checkpoint_every=3", "train.keep_checkpoints=5", "method.name=byol",
             *METHOD_TINY["byol"], POSTHOC, "ema.posthoc.every_samples=64"]
    full, _ = run(tmp_path, *steps)
    run_dir = tmp_path / "run"
    assert full.posthoc is not None
    want, averages = snapshot_bytes(run_dir), full.posthoc.state_dict()
    assert [s.samples_seen for s in list_snapshots(run_dir / FOLDER)][::2] == [64, 128, 192]
    manifest = json.loads((checkpoints(run_dir)[0] / "manifest.json").read_text())
    assert STATE_FILE in manifest["files"]
    header = json.loads((run_dir / "header.json").read_text())["posthoc_ema"]
    numel = sum(t.numel() for k, t in averages.items() if k.startswith("0/"))
    assert header["every_samples"] == 64 and header["bytes_per_snapshot"] == 2 * 4 * numel
    # The newest snapshot of sigma_rel 0.1 is that power EMA's average, bit for bit.
    last = [s for s in list_snapshots(run_dir / FOLDER) if s.sigma_rel == 0.1][-1]
    for name, t in read_snapshot(last).items():
        assert torch.equal(t, averages[f"1/{name}"]), name
    # After the checkpoint (96 samples): a write cut short, and a snapshot that differs from
    # what the resumed run will write there; both must be gone.
    (run_dir / FOLDER / ".tmp-000000000000160-ema0.safetensors").write_bytes(b"cut short")
    shutil.copy(run_dir / FOLDER / f"{64:015d}-ema1.safetensors", last.path)
    resumed = resume_from(full, run_dir, 3)
    assert resumed.posthoc is not None
    got = resumed.posthoc.state_dict()
    assert all(torch.equal(got[k], v) for k, v in averages.items())
    assert snapshot_bytes(run_dir) == want
    assert not list((run_dir / FOLDER).glob(".tmp-*"))


def test_snapshots_follow_samples_seen_through_a_batch_schedule(tmp_path: Path) -> None:
    """Batch 32 for an epoch, then 64 (40 digits a class: 12 steps, then 6): a snapshot at the
    first step ending past each multiple of 100 samples; a resume from step 9 (before the
    change) writes the same files; the tracked sigma_rel is reconstructed from all snapshots
    to 1e-3."""
    common = ["train.max_steps=0", "train.epochs=2", "train.batch_size=32",
              "data.train_per_class=40", "train.grad_accumulation=1",
              "scaling.reference_batch=32", "train.batch_schedule=[[1, 64]]",
              "train.checkpoint_every=9", POSTHOC, "ema.posthoc.every_samples=100"]
    full, _ = run(tmp_path, *common)
    run_dir = tmp_path / "run"
    ends = [32 * i for i in range(1, 13)] + [12 * 32 + 64 * i for i in range(1, 7)]
    assert full.state.samples_seen == ends[-1]
    want = {n for prev, n in zip([0, *ends], ends) if n // 100 > prev // 100} | {ends[-1]}
    found = sorted({s.samples_seen for s in list_snapshots(run_dir / FOLDER)})
    assert found == sorted(want) == [128, 224, 320, 448, 512, 640, 704, 768]
    files = snapshot_bytes(run_dir)
    resume_from(full, run_dir, 9)
    assert snapshot_bytes(run_dir) == files
    assert full.posthoc is not None
    plan = solve_reconstruction(list_snapshots(run_dir / FOLDER), 0.1)
    rebuilt = reconstruct(plan)
    tracked = full.posthoc.ema.average(1)
    for name, t in tracked.items():
        assert (rebuilt[name] - t).norm() <= 1e-3 * t.norm() + 1e-6, name


def test_a_bad_posthoc_section_is_one_line() -> None:
    for override, message in (("ema.posthoc.sigma_rels=[0.5]", "outside (0, 0.2887]"),
                              ("ema.posthoc.sigma_rels=[0.1, 0.1]", "repeats a value"),
                              ("ema.posthoc.every_samples=-1", "must be >= 0"),
                              ("ema.posthoc.dtype=fp8", "valid: fp32, bf16, fp16"),
                              ("ema.posthoc.width=1", "unknown key 'ema.posthoc.width'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
            load_config(None, [override])


# ---------------------------------------------------------------------------- the tool
@pytest.fixture(scope="module")
def sup_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny supervised run with two tracked EMAs, two power EMAs and a validation split."""
    out = tmp_path_factory.mktemp("posthoc")
    cfg = load_config(ROOT / "recipes" / "supervised_ema_digits.yaml", [
        *TINY, f"run.output_dir={out}", "train.max_steps=0", "train.epochs=2",
        "train.batch_size=128", "train.grad_accumulation=1", "scaling.reference_batch=128",
        "ema.extra_momenta=[0.5]", POSTHOC, "data.eval_subset=0"])
    Trainer(cfg, out / "run").fit()
    return out / "run"


def tool(*argv: Any) -> int:
    return int(load_tool("posthoc_ema").main([str(a) for a in argv]))


def test_the_tool_scores_exports_and_writes_json(sup_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep.json"
    assert tool(sup_run, "--sigma-rel", 0.03, 0.1, "--out", out, "--export", 0.1) == 0
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "classify" and out.with_suffix(".png").is_file()
    roles = {"teacher", "student", "ema_0.5", "posthoc_0.03", "posthoc_0.1"}
    assert set(doc["results"]) == roles | {f"{r}+bn" for r in roles}
    for scores in doc["results"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["nll"] > 0 and "val_accuracy" in scores
    assert doc["posthoc"]["0.1"]["profile_error"] < 1e-6  # tracked: itself
    assert doc["posthoc"]["0.03"]["profile_error"] > 1e-3  # fitted
    assert sum(doc["posthoc"]["0.03"]["coefficients"]) == pytest.approx(1.0)
    text = capsys.readouterr().out
    assert "posthoc_0.03" in text and "random init" in text and "timm.create_model" in text
    # The export is the tracked sigma_rel 0.1, BatchNorm recomputed: its weights are the
    # newest snapshot's.
    backbone = load_backbone(sup_run / "export" / "posthoc_0.1.safetensors")
    last = [s for s in list_snapshots(sup_run / FOLDER) if s.sigma_rel == 0.1][-1]
    stored = read_snapshot(last)
    for name, p in backbone.named_parameters():
        torch.testing.assert_close(p.detach(), stored[f"backbone.{name}"], rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize(("argv", "message"), [
    (["--sigma-rel", "0.4"], "--sigma-rel: sigma_rel must lie in (0, 0.2887]"),
    (["--sigma-rel", "0.1", "--up-to", "10"], "no post-hoc EMA snapshot at or before 10"),
    (["--sigma-rel", "0.1", "--export", "0"], "--export: sigma_rel must lie"),
    (["--sigma-rel", "0.1", "--recompute-bn", "-1"], "--recompute-bn: must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(sup_run: Path, capsys: pytest.CaptureFixture,
                                          argv: list[str], message: str) -> None:
    assert tool(sup_run, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_run_without_snapshots_is_refused(sup_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "plain"
    shutil.copytree(sup_run, copy, ignore=shutil.ignore_patterns(FOLDER))
    assert tool(copy, "--sigma-rel", 0.1) == 2
    assert "no post-hoc EMA snapshots in" in capsys.readouterr().err
    assert tool("--sigma-rel", 0.1) == 2  # neither RUN nor --train
    assert "give RUN" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(sup_run, damaged)
    first = sorted((damaged / FOLDER).glob("*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:100])
    assert tool(damaged, "--sigma-rel", 0.1) == 2
    err = capsys.readouterr().err
    assert f"snapshot {first} is damaged" in err and err.count("\n") == 1
