"""What a study is: the runs it needs, the claim they test and how its verdict is reached."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

HOLDS, FAILS, TOO_FEW = "holds", "does not hold", "not enough runs yet"

Record = Mapping[str, Any]  # one finished run as stored (store.py)


@dataclass(frozen=True)
class StudyVariant:
    """One arm of a study: its name, overrides and (when it differs) its own recipe."""

    name: str
    overrides: tuple[str, ...] = ()
    recipe: str | None = None
    minutes: float | None = None  # stated estimate of this arm, if it differs from the study's
    tool: str | None = None  # a tool study's arm with its own tools/ script


@dataclass(frozen=True)
class Analysis:
    """A study's verdict and the numbers behind it (markdown table rows, figure paths)."""

    verdict: str
    summary: str  # one or two sentences: ours beside the paper's, with the schedule
    table: tuple[str, ...] = ()  # markdown lines
    figures: tuple[str, ...] = ()  # file names under docs/results/


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    claim: str  # what "holds" means, in one sentence
    paper: str  # the paper's number (or finding) and where it comes from
    schedule: str  # stated beside every number of this study
    recipe: str  # "" for a tool study
    variants: tuple[StudyVariant, ...]
    seeds: tuple[int, ...] = (0,)
    common: tuple[str, ...] = ()  # may contain {data}: the data root (--data / SSL_EMA_DATA)
    device: Literal["cpu", "gpu"] = "gpu"
    minutes_per_run: float = 10.0  # stated estimate on `device` when nothing is measured
    estimate_source: str = ""
    env: Mapping[str, str] = field(default_factory=dict)  # for each tools/train.py process
    plot_keys: tuple[str, ...] = ()  # evaluation keys drawn against samples seen (report.py)
    analysis: Callable[[Study, Sequence[Record]], Analysis] | None = None
    tool: str = ""  # a tools/ script run instead of training: variants' overrides are its
    # arguments and its resolved arguments are the run's identity (tool_runs.py)
    timed: bool = False  # its runs measure time: each runs alone, whatever `run --jobs` says

    @property
    def needs_data(self) -> bool:
        return any("{data}" in o for o in self.overrides_of_all())

    def overrides_of_all(self) -> list[str]:
        return [*self.common, *(o for v in self.variants for o in v.overrides)]

    def recipe_of(self, variant: StudyVariant) -> str:
        return variant.recipe or self.recipe

    def tool_of(self, variant: StudyVariant) -> str:
        return variant.tool or self.tool


def kappa_arms(batches: dict[int, int]) -> tuple[StudyVariant, ...]:
    """``k1`` once, then ``k<kappa>_ema`` and ``k<kappa>_optimizer`` at each larger batch, the
    largest kappa first (kappa = 1 and the largest kappa with and without the rule already give
    a verdict): the arms of every EMA Scaling Rule study (``batches``: kappa -> batch)."""
    out = [StudyVariant("k1", (f"train.batch_size={batches[1]}",))]
    for k, b in sorted(batches.items(), reverse=True):
        if k > 1:
            out += [StudyVariant(f"k{k}_{rule}", (f"train.batch_size={b}",
                                                   f"scaling.rule={rule}"))
                    for rule in ("ema", "optimizer")]
    return tuple(out)
