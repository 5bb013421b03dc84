"""How fast each kind of device trains, measured, so that a time measured on one carries to
another: ``docs/results/devices.json``.

The yardstick is one workload measured the same way everywhere: BYOL ResNet-18 (CIFAR stem) at
batch 512 on 32 px images, bf16 autocast, channels_last, torch.compile, views made on the
device, the real ``Trainer`` step after compilation, in images per second. The H100's figure is
the H100 measurement (docs/RESULTS.md, 'BYOL training images/s on one H100'); every
other device's comes from the smoke check (`ssl_ema.reproduce.smoke`), which times that step at
the start of each lease and stores it here. It times recipes/byol_r18_lightly.yaml, the recipe
the smoke check must exercise anyway, not the H100's recipes/byol_r18.yaml: heads 1024 wide
instead of 4096 (a negligible share of a step's multiply-adds) and SimCLR's views instead of
BYOL's (the same operations less solarisation), so the two agree closely, not exactly
(docs/RESULTS.md, 'The GPU lease path'). A run measured on device A then takes about ``rate(A) /
rate(B)`` times as long on device B. This carries the step's speed, not a run's
start-up, compilation or evaluation, which the estimate scales alike: an estimate, said so
wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_ema.reproduce.jsonfile import read_json, write_json

FILE = "devices.json"
REFERENCE_GPU = "cuda (NVIDIA H100 80GB HBM3)"  # where the GPU studies' stated minutes are
YARDSTICK = ("BYOL ResNet-18 (CIFAR stem), batch 512, 32 px, bf16 autocast, channels_last, "
             "torch.compile, data.pipeline=device: Trainer images/s after compilation")
# The H100's yardstick: recipes/byol_r18.yaml through tools/bench_train.py ('ours'), commit
# 40d002e + 6da4c94, 2026-11-23 (docs/RESULTS.md, 'BYOL training images/s on one H100').
H100 = {"images_per_s": 21185.0, "date": "2026-11-23", "commit": "6da4c94",
        "source": "docs/RESULTS.md 'BYOL training images/s on one H100' (bench_train 'ours', "
                  "recipes/byol_r18.yaml)"}


def device_kind(device: str) -> str:
    """The kind estimates are matched on: ``cpu`` for any CPU, else the device string."""
    return "cpu" if device.startswith("cpu") else device


def short(device: str) -> str:
    """``cuda (NVIDIA H200)`` -> ``NVIDIA H200`` for messages."""
    return device[len("cuda ("):-1] if device.startswith("cuda (") else device


@dataclass(frozen=True)
class Speeds:
    """Measured yardstick rates by device kind (images/s)."""

    rates: Mapping[str, float]

    @classmethod
    def load(cls, results: Path) -> Speeds:
        devices = (read_json(results / FILE) or {}).get("devices", {})
        rates = {REFERENCE_GPU: H100["images_per_s"]}
        rates.update({k: float(v["images_per_s"]) for k, v in devices.items()
                      if isinstance(v, dict) and isinstance(v.get("images_per_s"), int | float)
                      and v["images_per_s"] > 0})
        return cls(rates)

    def ratio(self, to: str, frm: str) -> float | None:
        """Time on ``to`` / time on ``frm`` for the same run, if both were measured."""
        a, b = self.rates.get(device_kind(to)), self.rates.get(device_kind(frm))
        return None if a is None or b is None else b / a


def record_rate(results: Path, device: str, images_per_s: float, **about: Any) -> None:
    """Store ``device``'s yardstick rate (the smoke check's measurement) in devices.json."""
    path = results / FILE
    devices = dict((read_json(path) or {}).get("devices", {}))
    devices[device_kind(device)] = {"images_per_s": round(images_per_s, 1), **about}
    write_json(path, {"yardstick": YARDSTICK, "devices": {REFERENCE_GPU: H100, **devices}})
