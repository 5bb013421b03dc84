"""Run by test_reliability.py and killed with SIGKILL while it saves its second checkpoint."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ssl_ema.config import load_config
from ssl_ema.engine.trainer import Trainer


def main(out: Path, overrides: list[str]) -> None:
    cfg = load_config(None, [f"run.output_dir={out}", *overrides])
    trainer = Trainer(cfg, out / "run")
    save_state = trainer.accelerator.save_state

    def slow_save(path: str) -> None:
        save_state(path)
        if trainer.state.step == 2:  # half-way through the second save: signal, then hang
            (Path(path) / "partial.bin").write_bytes(b"\0" * 1024)
            (out / "saving").touch()
            time.sleep(120)

    trainer.accelerator.save_state = slow_save  # type: ignore[method-assign]
    trainer.fit()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
