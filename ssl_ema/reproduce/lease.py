"""What a GPU lease must hand back, packed as it goes: one tarball, rewritten after every run.

A lease (docs/TOOLS.md, `tools/lease.sh`) is a bare machine for a few minutes whose output
folder returns at most 8 files; nothing else survives it, and the command can be killed at its
time limit. So ``reproduce.py run --out DIR`` packs, after every finished run, the study
records and the measured speeds (``docs/results/*.json``), the report and figures once written,
and each run's small files (header, config, metrics, results, wall time: never its
checkpoints, which are far larger than a lease returns) into ``DIR/results.tar.gz``, written
under a temporary name and renamed into place, so that a kill at any moment leaves the
previous complete tarball or the new one. Unpacked here (``tar xzf results.tar.gz``) it
restores ``docs/results/`` and ``runs/`` as the lease left them. ``schedule`` says which lease
each pending run would land in (``reproduce.py list --leases``).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from ssl_ema.reproduce.devices import Speeds
from ssl_ema.reproduce.jsonfile import fsync_dir
from ssl_ema.reproduce.runner import Budget, StudyPlan, estimate_s, status
from ssl_ema.reproduce.store import Store

PACK = "results.tar.gz"
MAX_BYTES = 16 * 2**20  # one file a lease returns
RUN_FILES = ("header.json", "config.yaml", "results.json", "metrics.jsonl", "reproduce.json")
REPORT_FILES = ("*.json", "REPORT.md", "*.png")


def members(root: Path, results: Path, runs: Path) -> list[tuple[Path, str]]:
    """(file, name in the tarball) of everything a lease returns, names relative to
    ``root`` (the checkout) where the folders lie under it."""
    def name(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p).lstrip("/")

    out = [(p, name(p)) for pattern in REPORT_FILES for p in sorted(results.glob(pattern))]
    for run in sorted(p.parent for p in runs.glob("**/header.json")):
        out += [(run / f, name(run / f)) for f in RUN_FILES if (run / f).is_file()]
    return out


def pack(out: Path, root: Path, results: Path, runs: Path) -> Path:
    """Write ``out/results.tar.gz`` atomically; the runs' metrics are left out (with a
    warning line in the tarball) if the whole would exceed what a lease returns."""
    out.mkdir(parents=True, exist_ok=True)
    files = members(root, results, runs)
    blob = _tar(files)
    if len(blob) > MAX_BYTES:
        files = [(p, n) for p, n in files if not n.endswith("metrics.jsonl")]
        blob = _tar(files, note=b"metrics.jsonl files left out: over 16 MiB with them\n")
    path, tmp = out / PACK, out / f".{PACK}.tmp-{os.getpid()}"
    with tmp.open("wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(out)
    return path


def _tar(files: list[tuple[Path, str]], note: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, name in files:
            try:
                tar.add(path, arcname=name, recursive=False)
            except FileNotFoundError:  # a run folder replaced while packing: next pack has it
                continue
        if note:
            info = tarfile.TarInfo("PACK_NOTE.txt")
            info.size = len(note)
            tar.addfile(info, io.BytesIO(note))
    return buf.getvalue()


# ------------------------------------------------------------------------------- planning
SMOKE_S = 200.0  # tools/lease.sh: the smoke check's budget (170 s) and its start-up
SETUP_S = 40.0  # installing the wheel, unpacking CIFAR-10, and the report and pack at the end
COMMAND_S = 570.0  # tools/lease.sh's default budget of the 600 s a command may run


def schedule(plans: Sequence[StudyPlan], device: str, speeds: Speeds, results: Path,
             leases: int = 20) -> tuple[list[list[tuple[str, float]]], list[tuple[str, float]]]:
    """The pending runs of ``plans`` by the lease that would start them (as `spend` does: in
    priority order, a run only if what is left of the lease can finish it; the first lease
    runs the smoke check too), and the runs no lease can finish; each with its estimate."""
    pending = []
    for p in plans:
        store = Store(results, p.study.name)
        for job in p.jobs:
            state, fraction = status(job, store)
            if state != "done":
                need = estimate_s(p.study, job, store, device, speeds)[0] * (1.0 - fraction)
                pending.append((f"{p.study.name} {job.variant} seed {job.seed}", need))
    out: list[list[tuple[str, float]]] = []
    whole = Budget.of(COMMAND_S - SETUP_S)
    never = [(n, s) for n, s in pending if not whole.admits(s, whole.seconds)[0]]
    pending = [j for j in pending if j not in never]
    while pending and len(out) < leases:
        budget = Budget.of(COMMAND_S - SETUP_S - (SMOKE_S if not out else 0.0))
        left, lease = budget.seconds, []
        for job in list(pending):
            if budget.admits(job[1], left)[0]:
                lease.append(job)
                pending.remove(job)
                left -= job[1]
        out.append(lease)
    return out, never
