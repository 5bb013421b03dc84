"""Each study's verdict from its stored runs: holds / does not hold / not enough runs yet.

Every analysis reads only the records (``store.py``): final metrics and the evaluation curve of
each run. Accuracies are fractions in the records and points (%) in the text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from ssl_ema.engine.sweep import mean_std
from ssl_ema.reproduce.study import FAILS, HOLDS, TOO_FEW, Analysis, Record, Study

AnalysisFn = Callable[[Study, Sequence[Record]], Analysis]


def by_variant(records: Sequence[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r["variant"], []).append(r)
    return out


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _curve(record: Record, key: str) -> list[tuple[float, float]]:
    return [(float(e["samples_seen"]), float(e[key])) for e in record.get("curve", []) if key in e]


def _interp(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value of ``points`` (sorted by x) at ``x``, clamped at the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def mean_curve(records: Sequence[Record], key: str) -> list[tuple[float, float]]:
    """The seed-mean curve on the first run's evaluation points (seeds share them)."""
    curves = [_curve(r, key) for r in records]
    curves = [c for c in curves if c]
    if not curves:
        return []
    xs = [x for x, _ in curves[0]]
    return [(x, sum(_interp(c, x) for c in curves) / len(curves)) for x in xs]


def curve_deviation(runs: Sequence[Record], reference: Sequence[Record], key: str
                    ) -> tuple[float, float]:
    """Mean absolute gap (over evaluations after the first step) between each run's curve and
    the reference's seed-mean curve at the same samples seen; mean and standard error over
    runs."""
    ref = mean_curve(reference, key)
    gaps = []
    for r in runs:
        c = [(x, y) for x, y in _curve(r, key) if x > 0]
        if c and ref:
            gaps.append(sum(abs(y - _interp(ref, x)) for x, y in c) / len(c))
    if not gaps:
        return math.nan, math.nan
    m, sd = mean_std(gaps)
    return m, sd / math.sqrt(len(gaps))


def ema_curve_rule(reference: str, arms: Sequence[tuple[int, str, str]],
                   teacher: str, student: str, min_seeds: int = 2,
                   tolerance: float = 0.02) -> AnalysisFn:
    """Busbridge et al.'s claim on a model EMA that does not feed back: at each kappa the EMA
    rule keeps the teacher's accuracy curve (against samples seen) as close to kappa = 1 as the
    student's own (optimizer rule) allows, and without it the teacher departs further.

    Holds when for every kappa: the ruled teacher's deviation <= the student's + tolerance + 2 se,
    and the unruled teacher's deviation exceeds the ruled one's by more than tolerance + 2 se."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records)
        names = [reference, *(v for _, *pair in arms for v in pair)]
        if any(len(runs.get(n, [])) < min_seeds for n in names):
            have = ", ".join(f"{n} {len(runs.get(n, []))}" for n in names)
            return Analysis(TOO_FEW, f"needs {min_seeds} seeds of each variant (have: {have})")
        ref = runs[reference]
        rows = ["| κ | rule | teacher deviation (points) | student deviation (points) |",
                "|---|---|---|---|"]
        ok, parts = True, []
        for k, with_rule, without in arms:
            dev = {n: (curve_deviation(runs[n], ref, teacher),
                       curve_deviation(runs[n], ref, student)) for n in (with_rule, without)}
            for n, label in ((with_rule, "ema"), (without, "optimizer")):
                (t, tse), (s, sse) = dev[n]
                rows.append(f"| {k} | {label} | {_pts(t)} ± {_pts(tse)} | "
                            f"{_pts(s)} ± {_pts(sse)} |")
            (t_ema, se_ema), (s_ema, s_se) = dev[with_rule]
            (t_opt, se_opt), _ = dev[without]
            close = t_ema <= s_ema + tolerance + 2 * math.hypot(se_ema, s_se)
            apart = t_opt - t_ema > tolerance + 2 * math.hypot(se_ema, se_opt)
            ok &= close and apart
            parts.append(f"κ = {k}: teacher {_pts(t_ema)} points from κ = 1 with the rule "
                         f"(student {_pts(s_ema)}), {_pts(t_opt)} without")
        summary = "; ".join(parts) + f" (points: the mean |gap| between accuracy curves at " \
            f"equal samples seen, averaged over seeds; κ = 1: {len(ref)} seeds)."
        return Analysis(HOLDS if ok else FAILS, summary, tuple(rows))

    return analyse


def final_rule(reference: str, arms: Sequence[tuple[int, str, str]], key: str,
               tolerance: float = 0.01, falls_from: int = 4,
               anchor: str = "", floor: str = "", floor_margin: float = 0.03,
               companion: str = "") -> AnalysisFn:
    """The final-metric form (BYOL, DINO, pseudo-labelling at large batch): with the rule every
    kappa is within ``tolerance`` of kappa = 1; without it the metric falls by more than
    ``tolerance`` at every kappa >= ``falls_from``. Judged on the arms whose pair (with and
    without the rule) has run, once one such pair at kappa >= ``falls_from`` has; the summary
    names the arms still pending. With ``floor`` (a metric of each run, e.g.
    ``knn_random_bn``, the fair floor), kappa = 1 must also clear it by ``floor_margin``: a
    comparison of runs that learnt nothing says nothing about the rule. ``companion`` (e.g.
    ``knn_student``) is reported beside, outside the verdict: when the student falls as far as
    the teacher, the optimizer's half of the scaling, not the EMA's, moved the metric."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records)
        names = [reference, *(v for _, *pair in arms for v in pair)]
        missing = [n for n in names if not runs.get(n)]
        judged = [(k, w, o) for k, w, o in arms if runs.get(w) and runs.get(o)]
        if not runs.get(reference) or not any(k >= falls_from for k, _, _ in judged):
            return Analysis(TOO_FEW, f"runs missing: {', '.join(missing)}")

        def value(n: str, metric: str = key) -> float:
            return mean_std([r["metrics"][metric] for r in runs[n]])[0]

        base = value(reference)
        side = value(reference, companion) if companion else 0.0

        def row(n: str) -> str:
            cells = f"| {n} | {_pts(value(n))} | {_pts(value(n) - base)} |"
            if companion:
                cells += f" {_pts(value(n, companion))} | {_pts(value(n, companion) - side)} |"
            return cells

        head = f"| variant | {key} | gap to κ = 1 (points) |"
        rows = [head + (f" {companion} | gap (points) |" if companion else ""),
                "|---|---|---|" + ("---|---|" if companion else ""), row(reference)]
        ok = True
        for k, with_rule, without in judged:
            rows += [row(with_rule), row(without)]
            ok &= abs(value(with_rule) - base) <= tolerance
            if k >= falls_from:
                ok &= base - value(without) > tolerance
        cleared = ""
        if floor:
            fair = value(reference, floor)
            cleared = f" ({_pts(base - fair)} points above the fair floor {_pts(fair)})"
            if base - fair < floor_margin:
                ok = False
                cleared += f", less than the {_pts(floor_margin)} points that show learning"
        summary = (f"κ = 1: {_pts(base)}{cleared}; with the rule the largest gap is "
                   f"{_pts(max(abs(value(w) - base) for _, w, _ in judged))} points, "
                   f"without it {_pts(max(base - value(o) for _, _, o in judged))}"
                   + (f" ({companion} with the rule: largest gap "
                      f"{_pts(max(abs(value(w, companion) - side) for _, w, _ in judged))} "
                      "points)" if companion else "")
                   + (f"; {anchor}" if anchor else "")
                   + (f"; pending: {', '.join(missing)}" if missing else "") + ".")
        return Analysis(HOLDS if ok else FAILS, summary, tuple(rows))

    return analyse


def best_within(variant: str, key: str, target: float, tolerance: float) -> AnalysisFn:
    """A like-for-like anchor: the best value of ``key`` over the run's evaluations is within
    ``tolerance`` of the published ``target``."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records).get(variant, [])
        if not runs:
            return Analysis(TOO_FEW, f"the {variant} run has not finished")
        best = max(y for r in runs for _, y in _curve(r, key) or [(0, r["metrics"][key])])
        final = mean_std([r["metrics"][key] for r in runs])[0]
        verdict = HOLDS if abs(best - target) <= tolerance else FAILS
        return Analysis(verdict, f"best {key} {_pts(best)} (final {_pts(final)}) against "
                        f"{_pts(target)}; tolerance {_pts(tolerance)} points.")

    return analyse


def ema_gain(pairs: Mapping[str, str], ema_key: str, last_key: str) -> AnalysisFn:
    """Morales-Brotons et al.: the best EMA beats the last iterate, by more under label noise.
    ``pairs``: variant -> label (the first is clean, the last the noisiest)."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records)
        missing = [n for n in pairs if not runs.get(n)]
        if missing:
            return Analysis(TOO_FEW, f"runs missing: {', '.join(missing)}")
        rows = ["| labels | last iterate | best EMA | gain (points) |", "|---|---|---|---|"]
        gains = []
        for n, label in pairs.items():
            last = mean_std([r["metrics"][last_key] for r in runs[n]])[0]
            ema = mean_std([r["metrics"][ema_key] for r in runs[n]])[0]
            gains.append(ema - last)
            rows.append(f"| {label} | {_pts(last)} | {_pts(ema)} | {_pts(ema - last)} |")
        ok = all(g >= 0 for g in gains) and gains[-1] > gains[0]
        summary = "gain of the best EMA over the last iterate: " + ", ".join(
            f"{label} {_pts(g)} points" for label, g in zip(pairs.values(), gains)) + "."
        return Analysis(HOLDS if ok else FAILS, summary, tuple(rows))

    return analyse


def provided(analysis: AnalysisFn, variant: str, key: str, minimum: float,
             what: str) -> AnalysisFn:
    """``analysis`` judged only where its premise held: the seed mean of the final ``key`` of
    ``variant`` is at least ``minimum``, or the claim does not hold whatever the rest says (a
    pseudo-labelling study whose teacher never labelled an image tests no feedback). ``what``
    names the premise in the summary, e.g. "pseudo-labels fed back"."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        out = analysis(study, records)
        runs = by_variant(records).get(variant, [])
        if out.verdict == TOO_FEW or not runs:
            return out
        value = mean_std([r["metrics"][key] for r in runs])[0]
        premise = f"{what}: {key} {value:.3f} at {variant} (at least {minimum:g} needed)"
        if value < minimum:
            return Analysis(FAILS, f"{premise[0].upper()}{premise[1:]}, so the claim is not "
                            f"tested. {out.summary}", out.table, out.figures)
        return Analysis(out.verdict, f"{out.summary} {premise[0].upper()}{premise[1:]}.",
                        out.table, out.figures)

    return analyse
