"""The smoke check: every CUDA path a few steps each, first thing in a GPU lease.

A lease is a bare machine for minutes; a crash in a path no CPU test reaches (compilation,
nvJPEG, a kernel of the fused EMA) would otherwise cost the lease. `tools/smoke.py` runs these
checks on synthetic data it makes itself (`smoke_data`), each through the real ``Trainer`` where
it trains, and writes one JSON line per check as it ends (flushed and fsynced), so a killed
command still returns what finished:

- ``byol_lightly``: recipes/byol_r18_lightly.yaml (bf16, channels_last, torch.compile, SimCLR
  views on the device), cut by a checkpoint half-way and resumed; its steady images/s after
  compilation is the device's speed (`devices.py`'s yardstick), stored on a GPU;
- ``fused_ema``: ``ema.fused=true`` with two teachers: the checkpoint holds every teacher
  tensor, the run resumes, and the teachers against the per-teacher update's;
- ``dino_multicrop`` (local views on the device, bf16), ``moco``, ``supervised`` (five EMAs,
  BatchNorm recomputed for the evaluation), ``pseudo_label`` (RandAugment on the device);
- ``jpeg``: nvJPEG on its own on greyscale, CMYK and progressive JPEGs, then the jpeg pipeline
  over a folder holding them, with its fallbacks counted;
- ``views``: `tools/view_precision.py` (CUDA views against the CPU's, TF32's effect) and, on
  CUDA, the CUDA view tests.
On a CPU the same checks run at tiny sizes (tests/test_smoke.py).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_ema.config import load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.tracking import git_sha, read_metrics
from ssl_ema.engine.trainer import Trainer
from ssl_ema.methods import METHODS
from ssl_ema.reproduce import smoke_data
from ssl_ema.reproduce.devices import record_rate
from ssl_ema.reproduce.tool_runs import load_tool

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sizes:
    """How big the checks are: ``GPU`` on a CUDA device, ``CPU`` (tiny) elsewhere."""

    image: int
    classes: int
    per_class: int
    test_per_class: int
    batch: int  # BYOL's (the yardstick's: 512 on a GPU)
    steps: int  # BYOL's; the other checks take ``short``
    short: int
    workers: int
    tiny: tuple[str, ...] = ()  # overrides that shrink every model

    @property
    def warmup(self) -> int:
        return self.steps // 3  # steps before the timed ones (compilation happens here)


GPU = Sizes(32, 10, 410, 50, 512, 30, 8, 8)
CPU = Sizes(8, 4, 12, 4, 16, 4, 2, 0, (
    "model.backbone=test_resnet", "model.cifar_stem=false", "train.compile=false",
    "train.batch_size=8",
    "byol.projection_hidden_dim=32", "byol.projection_dim=16",
    "byol.prediction_hidden_dim=32", "eval.knn_k=5"))


class Smoke:
    """Runs the checks in order, one JSON line each, under ``work`` (a scratch folder)."""

    def __init__(self, work: Path, out: Path | None, results: Path, sizes: Sizes):
        self.work, self.out, self.results, self.sizes = work, out, results, sizes
        self.device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() \
            else "cpu"
        self.data = smoke_data.image_folder(work / "data", sizes.classes, sizes.per_class,
                                            sizes.test_per_class, sizes.image)

    def overrides(self, *extra: str, steps: int | None = None) -> list[str]:
        s = self.sizes
        return ["data.dataset=imagefolder", f"data.root={self.data}", "data.corrupt=trust",
                f"data.image_size={s.image}", f"data.num_workers={s.workers}",
                f"train.max_steps={steps or s.short}", "train.log_every=1",
                "eval.every_epochs=0", "train.checkpoint_every=0", *s.tiny, *extra]

    def train(self, name: str, recipe: str, *extra: str, steps: int | None = None,
              resume: Path | None = None) -> tuple[Trainer, dict[str, float]]:
        cfg = load_config(ROOT / "recipes" / recipe, self.overrides(*extra, steps=steps))
        trainer = Trainer(cfg, self.work / "runs" / name, resume)
        return trainer, trainer.fit()

    def run(self, checks: Sequence[str], budget_s: float) -> list[dict[str, Any]]:
        start, lines = time.monotonic(), []
        for name in checks:
            line: dict[str, Any] = {"check": name, "device": self.device}
            if time.monotonic() - start > budget_s:
                line.update(ok=None, skipped="the smoke check's budget is spent")
            else:
                t0 = time.monotonic()
                try:
                    line.update(CHECKS[name](self), ok=True)
                except Exception as e:  # recorded, and the next check runs
                    line.update(ok=False, error=f"{type(e).__name__}: {e}"[:600])
                line["seconds"] = round(time.monotonic() - t0, 1)
            self.write(line)
            lines.append(line)
        return lines

    def write(self, line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())


def losses(trainer: Trainer) -> list[float]:
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    out = [r["loss"] for r in rows if r["event"] == "train"]
    assert out and all(map(_finite, out)), f"non-finite loss: {out}"
    return out


def _finite(x: float) -> bool:
    return bool(torch.isfinite(torch.tensor(float(x))))


def averaged(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.accelerator.unwrap_model(trainer.method).state_dict()
    return {k: v for k, v in state.items() if k.startswith(("teacher.", "ema_copies."))}


def steady_rate(trainer: Trainer, after: int) -> float:
    """Median images/s of the training log's rows past step ``after``: compilation is over, and
    the row whose interval holds the mid-run checkpoint's write is outvoted."""
    rows = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl")
            if r["event"] == "train" and r["step"] > after]
    return statistics.median(r["images_per_s"] for r in rows)


def check_byol_lightly(s: Smoke) -> dict[str, Any]:
    z = s.sizes
    every = max(1, (z.steps - z.warmup) // 4)  # a few log rows (each a host sync) to take
    cfg = load_config(ROOT / "recipes" / "byol_r18_lightly.yaml", s.overrides(
        f"train.batch_size={z.batch}", f"train.checkpoint_every={z.steps // 2}",
        f"train.log_every={every}", steps=z.steps))
    full = Trainer(cfg, s.work / "runs" / "byol_lightly")
    full.fit()
    rate = steady_rate(full, z.warmup)  # before the resumed run appends its rows
    half = [c for c in checkpoints(full.run_dir) if c.name.endswith(f"{z.steps // 2:08d}")]
    resumed = Trainer(cfg, full.run_dir, half[0])
    resumed.fit()
    assert resumed.state.step == z.steps
    diff = max(float((a - b).abs().max()) for a, b in zip(averaged(full).values(),
                                                          averaged(resumed).values()))
    out = {"images_per_s": round(rate, 1), "loss": losses(full)[-1],
           "resumed_teacher_max_diff": diff}
    if s.device != "cpu" and z is GPU:
        record_rate(s.results, s.device, rate, date=time.strftime("%Y-%m-%d"),
                    commit=git_sha(), source="tools/smoke.py byol_lightly (recipes/"
                    "byol_r18_lightly.yaml: heads 1024, SimCLR views)")
        out["stored_speed"] = str(s.results / "devices.json")
    return out


def check_fused_ema(s: Smoke) -> dict[str, Any]:
    from safetensors.torch import load_file

    extra = ("ema.extra_momenta=[0.9]", "ema.buffers=average", "train.checkpoint_every=2",
             f"train.batch_size={min(s.sizes.batch, 256)}", "train.compile=false")
    fused, _ = s.train("fused", "byol_r18.yaml", *extra, "ema.fused=true", steps=4)
    saved = load_file(str(checkpoints(fused.run_dir)[-1] / "model.safetensors"))
    kept = averaged(fused)
    # NaN is never torch.equal to itself: a non-finite teacher is said as such, not as a
    # checkpoint that differs (the CPU bf16 conv fault once gave both, models/conv_guard.py).
    bad = [k for k, v in kept.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite teacher tensors after training: {bad[:3]}"
    assert all(torch.equal(saved[k], v.cpu()) for k, v in kept.items()), "checkpoint teacher"
    resumed = Trainer(fused.cfg, fused.run_dir, checkpoints(fused.run_dir)[0])
    resumed.fit()
    plain, _ = s.train("plain", "byol_r18.yaml", *extra, steps=4)
    other = averaged(plain)
    return {"checkpoint_holds_every_teacher_tensor": True,
            "resumed_equal": all(torch.equal(a, b) for a, b in zip(
                averaged(resumed).values(), kept.values())),
            "equal_to_unfused": all(torch.equal(v, other[k]) for k, v in kept.items()),
            "max_diff_to_unfused": max(float((v - other[k]).abs().max())
                                       for k, v in kept.items())}


def _method(s: Smoke, name: str, recipe: str, *extra: str) -> dict[str, Any]:
    tiny = METHODS[name].tiny_overrides if s.sizes is CPU else ()
    trainer, result = s.train(name, recipe, "data.pipeline=device", *tiny, *extra)
    finite = {k: v for k, v in result.items() if isinstance(v, float)}
    assert all(map(_finite, finite.values())), f"non-finite result: {finite}"
    return {"loss": losses(trainer), **{k: round(v, 4) for k, v in finite.items()}}


def check_dino(s: Smoke) -> dict[str, Any]:
    local = ("dino.local_views=2", f"dino.local_size={max(4, s.sizes.image // 2)}")
    return _method(s, "dino", "dino_r18.yaml", *local)


def check_moco(s: Smoke) -> dict[str, Any]:
    return _method(s, "moco", "moco_r18.yaml")


def check_supervised(s: Smoke) -> dict[str, Any]:
    return _method(s, "supervised", "supervised_ema_r18.yaml", "ema.recompute_bn_batches=2")


def check_pseudo_label(s: Smoke) -> dict[str, Any]:
    mu = "pseudo_label.mu=2" if s.sizes is CPU else "pseudo_label.mu=7"
    return _method(s, "pseudo_label", "pseudo_label_r18.yaml",
                   f"labels.per_class={max(2, s.sizes.per_class // 10)}", mu)


def check_jpeg(s: Smoke) -> dict[str, Any]:
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    alone = {}
    for kind, data in smoke_data.special_jpegs(s.sizes.image).items():
        try:  # the device's decoder forced, no fall-back
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                        mode=ImageReadMode.RGB, device=device)
            alone[kind] = "ok"
        except RuntimeError as e:
            alone[kind] = f"refused: {str(e).strip().splitlines()[0][:200]}"
    smoke_data.add_special_jpegs(s.data / "train" / "c0", s.sizes.image)
    try:
        _, result = s.train("jpeg", "byol_r18.yaml", "data.pipeline=jpeg", "train.compile=false",
                            f"data.index_cache={s.work / 'index'}",
                            f"train.batch_size={min(s.sizes.batch, 256)}")
    finally:
        for path in (s.data / "train" / "c0").glob("special_*"):
            path.unlink()
    return {"decoder": str(device), "alone": alone,
            "decode_fallbacks": result["decode_fallbacks"]}


def check_views(s: Smoke) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    tool = load_tool(ROOT / "tools" / "view_precision.py")
    out: dict[str, Any] = tool.measure(500 if cuda else 16, 32 if cuda else 8, 1,
                                       "cuda" if cuda else "cpu")
    if cuda:
        tests = ["tests/test_device_classify.py", "tests/test_device_pipeline.py"]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", "-p",
                               "no:cacheprovider", "-k", "cuda or fp32", *tests], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        out["cuda_tests"] = {"exit_code": proc.returncode,
                             "tail": proc.stdout.strip().splitlines()[-6:]}
        assert proc.returncode == 0, "the CUDA view tests failed"
    return out


CHECKS: dict[str, Callable[[Smoke], dict[str, Any]]] = {
    "byol_lightly": check_byol_lightly, "fused_ema": check_fused_ema, "dino_multicrop":
    check_dino, "moco": check_moco, "supervised": check_supervised,
    "pseudo_label": check_pseudo_label, "jpeg": check_jpeg, "views": check_views}
