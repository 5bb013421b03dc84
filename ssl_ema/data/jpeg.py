"""JPEG folders larger than the accelerator's memory, decoded there (``data.pipeline=jpeg``).

Loader workers only read each file's bytes; the main process decodes the whole batch in one
call to torchvision's ``decode_jpeg(list, device="cuda")`` (nvJPEG's batched decoder; on a CPU
run the same call decodes with libjpeg-turbo, which is what the tests exercise), then makes the
views with the device pipeline's ops (`gpu_augment`): a random resized crop straight from each
decoded image, whatever its size, to the view's size (crop, then an antialiased bilinear resize:
torchvision's ``resized_crop`` on tensors), then the batched colour ops. Why torchvision rather
than NVIDIA DALI: it is already a dependency, it decodes into torch tensors on torch's stream,
and the views stay ours, so both device pipelines draw from one distribution.

Determinism as `device.DeviceTrainStream`: the epoch's order is drawn from (seed, epoch), and
the view parameters of the sample at position p of that order from (seed, epoch, p // 1024)
(blocks of `BLOCK` positions, so that no table of the whole epoch is held), so a batch is a
function of (seed, epoch, index), whatever the batch size, process count or resume point. The
crops are drawn as uniforms and placed once the image's size is known (`gpu_augment.place_crops`).

Unreadable files (``data.corrupt``): a file whose batch fails to decode is decoded alone, on the
device, then with torchvision's CPU decoders (PNGs and CMYK JPEGs named .jpg); one that none
reads stops the run naming it (``fail``, ``trust``) or leaves the batch (``skip``, counted).
A file the pipeline's decoder (nvJPEG on a GPU) refuses and torchvision's CPU decoders read is
never silent: each distinct failure (the decoder's own error: a format it lacks, or nvJPEG
failing as a whole) is reported in one warning line and every such file is counted
(``decode_fallbacks``, in results.json), so that a GPU run decoding on the CPU shows in its
numbers. Running out of device memory is not a decoding failure: it is raised, never hidden
by a slower CPU decode.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from ssl_ema.config_schema import Config
from ssl_ema.data import gpu_augment
from ssl_ema.data.datasets import DataBundle, DataError
from ssl_ema.data.device import view_specs
from ssl_ema.data.file_index import IndexedFolder
from ssl_ema.data.gpu_augment import CropDraw, ViewParams, ViewSpec

BLOCK = 1024  # positions of an epoch's order whose view parameters are drawn together


# ------------------------------------------------------------------------------- decoding
class Decoded(NamedTuple):
    """A batch's images (None: no decoder reads the file) and, for each file the pipeline's
    decoder refused but a CPU decoder read, its index and the refusal."""

    images: list[Tensor | None]
    on_cpu: list[tuple[int, str]]


def _decode_one(data: Tensor, device: torch.device) -> tuple[Tensor | None, str]:
    """One file -> (uint8 (3, H, W) on ``device`` or None, the pipeline decoder's error if a
    CPU decoder had to read it)."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device), ""
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        image = decode_image(data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError:
        return None, ""
    return image, error


def decode_batch(files: Sequence[Tensor], device: torch.device) -> Decoded:
    """Encoded files (uint8 byte tensors on the CPU) -> RGB uint8 (3, H_i, W_i) on ``device``,
    in one batched decode; file by file when that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # libjpeg's "extraneous bytes" chatter
            return Decoded(list(decode_jpeg(list(files), mode=ImageReadMode.RGB,
                                            device=device)), [])
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # a file the batch decoder refuses: find it, decode the rest
        pairs = [_decode_one(f, device) for f in files]
        return Decoded([image for image, _ in pairs],
                       [(i, error) for i, (image, error) in enumerate(pairs)
                        if error and image is not None])


def resized_crops(images: Sequence[Tensor], boxes: Tensor, size: int) -> Tensor:
    """uint8 (3, H_i, W_i) images + integer boxes (B, 4) x1, y1, x2, y2 -> float
    (B, 3, size, size) in [0, 1]: each box cropped, then resized with antialiasing (bilinear,
    half-pixel centres), as torchvision's ``resized_crop`` on a float tensor."""
    out = torch.empty(len(images), 3, size, size, device=images[0].device)
    for i, (image, box) in enumerate(zip(images, boxes.long().tolist())):
        x1, y1, x2, y2 = box
        crop = image[None, :, y1:y2, x1:x2].float()
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)[0]
    return out.div_(255.0)


# ------------------------------------------------------------------------------- reading
class FileBytes(Dataset):
    """``[i]`` -> (the file's bytes, class, i): what a loader worker does (no decoding)."""

    def __init__(self, folder: IndexedFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.folder.read_bytes(i), self.folder.targets[i], i


def collate_files(items: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    data, labels, index = zip(*items)
    return list(data), torch.tensor(labels), torch.tensor(index)


# ------------------------------------------------------------------------------- the stream
class JpegTrainStream:
    """Training batches ``(*views, labels)`` decoded and augmented on ``device``."""

    def __init__(self, folder: IndexedFolder, specs: Sequence[ViewSpec], mean: Sequence[float],
                 std: Sequence[float], batch: int, device: torch.device, *, seed: int,
                 rank: int = 0, world: int = 1, num_workers: int = 0, corrupt: str = "fail",
                 channels_last: bool = False):
        self.folder, self.specs, self.batch, self.device = folder, tuple(specs), batch, device
        self.seed, self.rank, self.world = seed, rank, world
        self.num_workers, self.corrupt = num_workers, corrupt
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch: int | None = None
        self.order = torch.empty(0, dtype=torch.int64)
        self.skipped: set[str] = set()  # unreadable files left out so far (data.corrupt=skip)
        self.decode_fallbacks = 0  # files the pipeline's decoder refused and the CPU's read
        self._reported: set[str] = set()  # its errors already reported
        self._block: tuple[int, list[tuple[CropDraw, ViewParams]]] | None = None
        # One loader for the whole run, its workers kept between epochs: `iter_from` refills
        # the batch plan (iterated in this process) in place.
        self._plan: list[list[int]] = []
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.folder) // (self.batch * self.world)  # drop the last partial batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        g = torch.Generator().manual_seed(hash((self.seed, epoch)) % 2**63)
        self.order = torch.randperm(len(self.folder), generator=g)

    def block(self, b: int) -> list[tuple[CropDraw, ViewParams]]:
        """Every view's draws for positions ``b * BLOCK ...`` of the epoch (the last cached)."""
        if self._block is None or self._block[0] != b:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, b)) % 2**63)
            self._block = (b, [(gpu_augment.draw_crops(s, BLOCK, g),
                                gpu_augment.draw_colour(s, BLOCK, g)) for s in self.specs])
        return self._block[1]

    def draws(self, positions: Tensor) -> list[tuple[CropDraw, ViewParams]]:
        """Each view's draws for these (ascending) positions of the epoch's order."""
        parts = []  # per block the positions cover: each view's draws at those positions
        for b in (positions // BLOCK).unique().tolist():  # ascending, as the positions
            offset = positions[positions // BLOCK == b] % BLOCK
            parts.append([(crop.take(offset), colour.take(offset))
                          for crop, colour in self.block(b)])
        return [(CropDraw(*map(torch.cat, zip(*(part[v][0] for part in parts)))),
                 ViewParams(*map(torch.cat, zip(*(part[v][1] for part in parts)))))
                for v in range(len(self.specs))]

    def batches(self, start: int) -> list[list[int]]:
        """This rank's sample indices of batches ``start, start + 1, ...`` of the epoch."""
        out = []
        for step in range(start, len(self)):
            lo = (step * self.world + self.rank) * self.batch
            out.append(self.order[lo:lo + self.batch].tolist())
        return out

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, ...]]:
        """Batches ``start``, ``start + 1``, ... of the epoch set by `set_epoch`."""
        if self.epoch is None:
            raise RuntimeError("call set_epoch before iterating")
        self._plan[:] = self.batches(start)
        if self._loader is None:
            self._loader = DataLoader(
                FileBytes(self.folder), batch_sampler=self._plan, num_workers=self.num_workers,
                collate_fn=collate_files, pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0)
        for step, (files, labels, index) in enumerate(self._loader, start):
            lo = (step * self.world + self.rank) * self.batch
            yield self.make(files, labels, torch.arange(lo, lo + len(files)), index)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return self.iter_from(0)

    def make(self, files: list[Tensor], labels: Tensor, positions: Tensor, index: Tensor
             ) -> tuple[Tensor, ...]:
        """One batch: decode, drop the unreadable (per data.corrupt), crop, colour."""
        decoded, on_cpu = decode_batch(files, self.device)
        if on_cpu:
            self._fell_back([(int(index[i]), error) for i, error in on_cpu])
        keep = torch.tensor([d is not None for d in decoded])
        if not keep.all():
            self._unreadable(index[~keep].tolist())
        images = [d for d in decoded if d is not None]
        heights = torch.tensor([d.shape[-2] for d in images])
        widths = torch.tensor([d.shape[-1] for d in images])
        views = []
        for spec, (crop, colour) in zip(self.specs, self.draws(positions[keep])):
            boxes = gpu_augment.place_crops(spec, crop, heights, widths)
            x = resized_crops(images, boxes, spec.size)
            p = colour.to(self.device)
            views.append(gpu_augment.colour(x, p, spec, self.mean, self.std)
                         .contiguous(memory_format=self.memory_format))
        return (*views, labels[keep].to(self.device, non_blocking=True))

    def _fell_back(self, failures: list[tuple[int, str]]) -> None:
        """Count files the pipeline's decoder refused; one warning line per distinct error."""
        self.decode_fallbacks += len(failures)
        for i, error in failures:
            if error not in self._reported:
                self._reported.add(error)
                print(f"warning: the {self.device.type.upper()} JPEG decoder failed on "
                      f"'{self.folder.samples[i][0]}' ({error}); decoded on the CPU instead "
                      "(each such file counts in decode_fallbacks, results.json)",
                      file=sys.stderr)

    def _unreadable(self, index: list[int]) -> None:
        paths = [self.folder.samples[i][0] for i in index]
        if self.corrupt != "skip":
            raise DataError(f"'{paths[0]}' is not a readable image; remove it or set "
                            "data.corrupt=skip to leave such files out")
        for path in set(paths) - self.skipped:
            warnings.warn(f"left out unreadable '{path}' (data.corrupt=skip)", stacklevel=3)
        self.skipped.update(paths)
        if len(paths) == self.batch:
            raise DataError(f"no file of a batch is readable (e.g. '{paths[0]}'); check "
                            "data.root")


def jpeg_streams(bundle: DataBundle, cfg: Config, per_device: dict[int, int],
                 device: torch.device, rank: int, world: int) -> dict[int, JpegTrainStream]:
    """A training stream per batch size of the run (the evaluation sets stay loaders)."""
    folder = bundle.train.source
    if not isinstance(folder, IndexedFolder):
        raise DataError("data.pipeline=jpeg reads data.dataset=imagefolder folders")
    specs = view_specs(bundle.method)
    return {b: JpegTrainStream(folder, specs, bundle.mean, bundle.std, per, device,
                               seed=cfg.run.seed, rank=rank, world=world,
                               num_workers=cfg.data.num_workers, corrupt=cfg.data.corrupt,
                               channels_last=cfg.train.channels_last)
            for b, per in per_device.items()}
