"""`fsync`: a written file, or a directory's entries (a rename), on the disk before we go on.

The one helper of the atomic writers (checkpoints, `engine.checkpoint`; post-hoc EMA snapshots,
`posthoc.snapshots`): write under a temporary name, fsync, rename, fsync the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory too: its entries (the rename) reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
