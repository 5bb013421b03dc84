"""An ImageFolder's file list, scanned once and cached, and the folder read through it.

torchvision's ``ImageFolder`` lists every class folder at each start-up, and ``imagefolder``'s
corrupt-file check opens every file: minutes for ImageNet's 1.28 M images. The JPEG pipeline
(``data.pipeline=jpeg``) instead reads the ``(path, class)`` list from a cache file keyed by the
folder's path and the modification times of the folder and of its class folders (adding or
removing a file changes its class folder's mtime), so a second start-up lists nothing and opens
no image. Corrupt files are then found lazily, when a batch decodes (`ssl_ema.data.jpeg`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ssl_ema.config_schema import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INDEX_VERSION = 1  # bump when the cached layout changes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssl_ema" / "file_index"


def _class_dirs(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)


def index_key(folder: Path) -> str:
    """Hash of the folder's absolute path and the mtimes of it and its class folders."""
    folder = folder.resolve()
    stamps = [(e.name, e.stat().st_mtime_ns) for e in _class_dirs(folder)]
    raw = json.dumps([INDEX_VERSION, str(folder), folder.stat().st_mtime_ns, stamps])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def scan_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, sorted ``(path relative to folder, class)``): torchvision's ImageFolder
    order (classes sorted, files sorted within a class, links followed)."""
    classes = [e.name for e in _class_dirs(folder)]
    samples = []
    for c, name in enumerate(classes):
        for base, _, files in sorted(os.walk(folder / name, followlinks=True)):
            rel = Path(base).relative_to(folder)
            samples += [(str(rel / f), c) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, samples


def cached_index(folder: Path, cache_dir: Path | None = None
                 ) -> tuple[list[str], list[tuple[str, int]], Path, bool]:
    """(classes, samples, cache file, whether it was reused) of ``folder``: read from the cache
    when the key matches, else scanned and written (atomically; an unwritable cache is only
    skipped)."""
    cache = (cache_dir or default_cache_dir()) / f"{index_key(folder)}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        return saved["classes"], [(p, int(c)) for p, c in saved["samples"]], cache, True
    classes, samples = scan_folder(folder)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"folder": str(folder.resolve()), "classes": classes,
                                   "samples": samples}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only cache costs a re-scan next time, nothing else
    return classes, samples, cache, False


class IndexedFolder(Dataset):
    """An ImageFolder read through a file list: ``[i]`` is ``(PIL RGB image, class)`` (the
    evaluation sets and the loader pipeline), `read_bytes` the file's undecoded bytes (the JPEG
    pipeline's loader workers)."""

    def __init__(self, folder: Path, classes: list[str], samples: list[tuple[str, int]],
                 blank_unreadable: bool = False):
        # blank_unreadable (data.corrupt=skip): an unreadable file found while evaluating is
        # evaluated as a black image, with a warning naming it; the sets keep their size.
        self.root, self.classes, self.blank_unreadable = folder, classes, blank_unreadable
        self.samples = [(str(folder / p), c) for p, c in samples]
        self.targets = [c for _, c in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[object, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), label
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            if not self.blank_unreadable:
                raise ConfigError(f"'{path}' is not a readable image; remove it or set "
                                  "data.corrupt=skip to evaluate it as a black image") from None
            warnings.warn(f"'{path}' is not a readable image; evaluated as a black image "
                          "(data.corrupt=skip)", stacklevel=2)
            return Image.new("RGB", (1, 1)), label

    def read_bytes(self, i: int) -> Tensor:
        """The file's bytes (in a loader worker); a file gone or unreadable since start-up is
        one line naming it, not an OSError the trainer would take for a disk fault."""
        path = self.samples[i][0]
        try:
            with open(path, "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as e:
            raise ConfigError(f"cannot read '{path}' ({e.strerror or e}), listed at start-up; "
                              "restore it, or resume without it (the file list is read again "
                              "when its folder changes)") from None

    def drop(self, paths: set[str]) -> None:
        """Leave ``paths`` out (the start-up sample's unreadable files, data.corrupt=skip)."""
        self.samples = [s for s in self.samples if s[0] not in paths]
        self.targets = [c for _, c in self.samples]
