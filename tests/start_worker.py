"""Run twice at once by test_silent_acceptance.py: ``tools/train.py``'s ``train``, started on
the test's word, so that both runs ask for their folder in the same second.

    python tests/start_worker.py GO_FILE RECIPE [key=value ...]

Everything is imported first; then the worker creates ``GO_FILE.ready-<pid>``, waits for
``GO_FILE`` to appear and trains; its exit code is ``train``'s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ssl_ema.engine.launch import train
from ssl_ema.engine.trainer import Trainer  # noqa: F401  (imported before the start)


def main(go: Path, recipe: str, overrides: list[str]) -> int:
    go.with_name(f"{go.name}.ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 300
    while not go.exists():
        if time.monotonic() > deadline:
            return 4
        time.sleep(0.002)
    return train(recipe, overrides)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
