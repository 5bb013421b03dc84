"""Snapshots of the power EMAs on disk: one safetensors file per (samples seen, EMA).

EDM2 (Sec. 3.2, App. C.2) stores the tracked averages every so often; any profile is later
fitted from them. Here the interval is in samples seen, so a batch schedule moves no snapshot,
and each file carries what the fit needs in its metadata (samples seen, sigma_rel, gamma), never
in its name alone. Files are written under a temporary name, fsynced and renamed (as
`ssl_ema.engine.checkpoint` does), so a killed run never leaves half a snapshot that reads as
whole. Their cost is the averaged tensors' bytes in the chosen dtype, per EMA and snapshot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ssl_ema.engine.fsync import fsync

FORMAT = "ssl_ema.posthoc_snapshot/1"
META_KEY = "posthoc_snapshot"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
SNAPSHOT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                           "fp16": torch.float16}


class SnapshotWriteError(RuntimeError):
    """A snapshot could not be written; the message names it and says what is intact."""


@dataclass(frozen=True)
class Snapshot:
    """One stored power EMA: where it is and the profile it averaged with."""

    path: Path
    samples_seen: int
    sigma_rel: float
    gamma: float
    dtype: str


def snapshot_dtype(name: str) -> torch.dtype:
    if name not in SNAPSHOT_DTYPES:
        raise ValueError(f"unknown snapshot dtype '{name}'; valid: {', '.join(SNAPSHOT_DTYPES)}")
    return SNAPSHOT_DTYPES[name]


def check_interval(interval: int) -> None:
    if interval <= 0:
        raise ValueError(f"the snapshot interval must be a positive number of samples, "
                         f"got {interval}")


def snapshot_due(previous: int, current: int, interval: int) -> bool:
    """Did samples seen cross a multiple of ``interval`` between two updates?

    The snapshot is then taken at ``current`` (recorded exactly), so a batch that does not
    divide the interval delays it by less than one step instead of skipping it.
    """
    check_interval(interval)
    return current // interval > previous // interval


def payload_bytes(tensors: Mapping[str, torch.Tensor], dtype: str) -> int:
    """Bytes of one snapshot's tensors in ``dtype`` (the file adds a header of its names)."""
    itemsize = torch.empty((), dtype=snapshot_dtype(dtype)).element_size()
    return sum(t.numel() for t in tensors.values()) * itemsize



def _cast(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        cast = t.detach().to("cpu", snapshot_dtype(dtype)).contiguous()
        if not torch.isfinite(cast).all():  # fp16 tops out near 65504; a NaN would spread
            raise ValueError(f"{name} is not finite in {dtype}: use bf16 or fp32 snapshots")
        out[name] = cast
    return out


def write_snapshot(folder: Path, tensors: Mapping[str, torch.Tensor], *, samples_seen: int,
                   sigma_rel: float, gamma: float, index: int, dtype: str = "fp32") -> Path:
    """Write one power EMA at ``samples_seen`` into ``folder`` atomically; return its path."""
    data = _cast(tensors, dtype)
    final = folder / f"{samples_seen:015d}-ema{index}{SUFFIX}"
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    # One metadata key: safetensors writes several in a random order, and a resumed run must
    # write the same bytes as an uninterrupted one.
    meta = {META_KEY: json.dumps({"format": FORMAT, "samples_seen": samples_seen,
                                  "sigma_rel": sigma_rel, "gamma": gamma, "dtype": dtype},
                                 sort_keys=True)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Serialised here and written by us: a full disk is then an OSError with its errno
        # (safetensors' own writer reports it as a SafetensorError string).
        with tmp.open("wb") as f:
            f.write(save(data, metadata=meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync(folder)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SnapshotWriteError(f"could not write post-hoc EMA snapshot {final}: "
                                 f"{e.strerror or e}; the earlier snapshots in {folder} are "
                                 "intact; free space or make it writable, then resume") from e
    return final


def read_snapshot_info(path: Path) -> Snapshot:
    """The metadata of one snapshot file; a ValueError if it is not one or is damaged."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"post-hoc EMA snapshot {path} is damaged ({e}); delete it and "
                         "reconstruct from the others") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot (format "
                         f"{meta.get('format')!r}); keep only snapshots in {path.parent}")
    return Snapshot(path, int(meta["samples_seen"]), float(meta["sigma_rel"]),
                    float(meta["gamma"]), meta["dtype"])


def list_snapshots(folder: Path, up_to: int | None = None) -> list[Snapshot]:
    """The snapshots in ``folder`` (at most ``up_to`` samples seen), by samples seen."""
    if not folder.is_dir():
        return []
    found = [read_snapshot_info(p) for p in folder.glob(f"*{SUFFIX}")
             if not p.name.startswith(TMP_PREFIX)]
    kept = [s for s in found if up_to is None or s.samples_seen <= up_to]
    return sorted(kept, key=lambda s: (s.samples_seen, s.sigma_rel))


def read_snapshot(snapshot: Snapshot, device: str | torch.device = "cpu",
                  ) -> dict[str, torch.Tensor]:
    """The tensors of ``snapshot`` in their stored dtype."""
    try:
        return load_file(str(snapshot.path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"post-hoc EMA snapshot {snapshot.path} is damaged ({e}); delete it "
                         "and reconstruct from the others") from e


def discard_after(folder: Path, samples_seen: int) -> list[Path]:
    """Remove snapshots past ``samples_seen`` and leftover temporary files (on resume).

    A run resumed from a checkpoint retraces the samples after it; what was written there
    belongs to the interrupted future and is written again when reached.
    """
    if not folder.is_dir():
        return []
    removed = list(folder.glob(f"{TMP_PREFIX}*{SUFFIX}"))
    removed += [s.path for s in list_snapshots(folder) if s.samples_seen > samples_seen]
    for path in removed:
        path.unlink()
    return removed


def disk_usage(folder: Path) -> int:
    """Bytes the snapshots in ``folder`` take on disk (file sizes)."""
    return sum(s.path.stat().st_size for s in list_snapshots(folder))

