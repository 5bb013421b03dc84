"""What the tests share: paths, the tiny run's overrides (built from the registry's
`MethodSpec.tiny_overrides`), the tiny run itself and its bitwise resume check, small image
folders, tools loaded as modules. Test modules import from here, never from each other."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from ssl_ema.config import load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.trainer import Trainer
from ssl_ema.methods import METHODS
from ssl_ema.reproduce.analyses import best_within
from ssl_ema.reproduce.study import Study, StudyVariant

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def python() -> str:
    return sys.executable


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (registered, so its dataclasses find their module)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The shared tiny run: 8 px digits, timm's test_resnet (0.37 M parameters: what these runs check
# does not depend on the backbone's size, and ResNet-18 made them most of the suite's time), 3
# optimizer steps of 2 micro-batches. Per method, the registry's `MethodSpec.tiny_overrides`
# shrink its heads and views; TINY is the default method's (BYOL's) run.
TINY_DATA = ["data.image_size=8", "data.num_workers=0", "data.eval_subset=64",
             "model.backbone=test_resnet", "model.cifar_stem=false", "optim.name=sgd",
             "optim.lr=0.05", "optim.warmup_epochs=0", "train.batch_size=16",
             "train.grad_accumulation=2", "train.epochs=1", "train.max_steps=3",
             "train.log_every=1", "eval.every_epochs=0", "scaling.reference_batch=16",
             "eval.knn_k=5"]
METHOD_TINY = {name: list(spec.tiny_overrides) for name, spec in METHODS.items()}
TINY = [*TINY_DATA, *METHOD_TINY["byol"]]
# The generic smoke run covers every registered self-supervised method; the classification
# methods (labels, splits) have their own runs in test_classification.py.
SELF_SUPERVISED = sorted(name for name, spec in METHODS.items() if spec.labels == "none")


def tiny(method: str, *extra: str) -> list[str]:
    """The tiny run of ``method`` (its registered tiny overrides), then ``extra``."""
    return [*TINY_DATA, f"method.name={method}", *METHOD_TINY[method], *extra]


# Checkpoint tests: one micro-batch per step, five checkpoints kept.
FAST = [*TINY, "train.grad_accumulation=1", "train.keep_checkpoints=5"]
STEPS = ["train.grad_accumulation=1", "train.max_steps=4", "train.checkpoint_every=1",
         "train.keep_checkpoints=5"]


def run(tmp_path: Path, *extra: str) -> tuple[Trainer, dict[str, float]]:
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", *extra])
    trainer = Trainer(cfg, tmp_path / "run")
    return trainer, trainer.fit()


def resume_from(full: Trainer, run_dir: Path, step: int) -> Trainer:
    """Resume ``full``'s run from its checkpoint at ``step``, train to the end, and check that
    every tensor of the method (student, teachers, heads, buffers) equals the uninterrupted
    run's, bit for bit; return the resumed trainer for further checks."""
    ckpt = {c.name: c for c in checkpoints(run_dir)}[f"step_{step:08d}"]
    resumed = Trainer(full.cfg, run_dir, ckpt)
    resumed.fit()
    a = resumed.accelerator.unwrap_model(resumed.method).state_dict()
    b = full.accelerator.unwrap_model(full.method).state_dict()
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    return resumed


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ")
    return line


# ------------------------------------------------------------------------------ image folders
def tiny_imagefolder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c, colour in enumerate(("red", "blue")):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    (root / "train" / "class1" / "broken.png").write_bytes(b"not an image at all")
    return root


SIZES = ((24, 18), (17, 30), (20, 20), (33, 15), (16, 26))  # (height, width): all differ


def jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
    from PIL import Image

    # smooth content (a random 4x4 colour field upscaled): JPEG keeps it close to the input
    field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_folder(root: Path, per_class: int = 5, seed: int = 0) -> Path:
    """root/{train,test}/class{0,1}/*.jpg of the varied SIZES."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = SIZES[(i + c) % len(SIZES)]
                (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(rng, h, w))
    return root


def cut_jpeg(path: Path) -> None:
    """Cut a JPEG off mid-data: halfway between its start-of-scan marker (FF DA) and its end."""
    raw = path.read_bytes()
    path.write_bytes(raw[:(raw.index(b"\xff\xda") + len(raw)) // 2])


def cut_jpeg_folder(root: Path) -> tuple[Path, list[str]]:
    """A JPEG folder whose train/class1/001.jpg is cut off mid-data (and whose
    train/class0/002.jpg, intact, has bytes after its end-of-image marker); the overrides."""
    from PIL import Image

    jpeg_folder(root, per_class=3)
    cut = root / "train" / "class1" / "001.jpg"
    cut_jpeg(cut)
    with Image.open(cut) as image:
        image.verify()  # what the start-up check relied on: it passes the cut file
    padded = root / "train" / "class0" / "002.jpg"
    padded.write_bytes(padded.read_bytes() + b"\0" * 16)  # decoders ignore what follows FF D9
    return cut, ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=8"]


def rgb_folder(root: Path, per_class: int = 40) -> Path:
    """Grey digits tinted per image, saved as a 16 px RGB ImageFolder (train and test)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    counts: dict[tuple[str, int], int] = {}
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "test" if i % 4 == 0 else "train"
        if counts.get((split, label), 0) >= per_class:
            continue
        counts[(split, label)] = counts.get((split, label), 0) + 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(0.3, 1.0, 3)
        rgb = (image[..., None] / 16 * tint * 255).astype(np.uint8)
        Image.fromarray(rgb).resize((16, 16), Image.BILINEAR).save(folder / f"{i}.png")
    return root


# A study of two short digits epochs (the reproduction suite's tests).
STUDY_TINY = ("data.eval_subset=64", "data.image_size=8", "train.epochs=2",
              "train.batch_size=256", "train.log_every=1", "optim.warmup_epochs=0")


def tiny_study(*extra: str) -> Study:
    return Study(name="tiny", title="tiny", claim="c", paper="p", schedule="2 epochs",
                 recipe="recipes/scaling_digits.yaml", variants=(StudyVariant("a"),),
                 common=(*STUDY_TINY, *extra), device="cpu", minutes_per_run=1.0,
                 estimate_source="a guess", plot_keys=("acc_teacher_test",),
                 analysis=best_within("a", "acc_student_test", 0.0, 2.0))


def poison_freed_memory() -> None:
    """Leave NaN in the allocator's freed blocks: a kernel that reads memory it never wrote
    (oneDNN's CPU bf16 conv weight gradient, `ssl_ema.models.conv_guard`) then shows it, in
    whatever order the tests run."""
    for n in (1 << 10, 1 << 13, 1 << 16, 1 << 19):
        junk = [torch.full((n,), float("nan"), dtype=dtype)
                for dtype in (torch.bfloat16, torch.float32) for _ in range(3)]
        del junk
