"""Verdicts of the tool studies (``tool_runs.py``) from their stored records.

Each record keeps the tool's own JSON as ``result``: tools/noisy_quadratic.py's deviation rows,
tools/bench_ema.py's per-model timings, tools/bench_train.py's images/s. The verdicts are
recomputed from those numbers here, not read off a tool's own ``holds``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ssl_ema.reproduce.analyses import AnalysisFn, by_variant
from ssl_ema.reproduce.study import FAILS, HOLDS, TOO_FEW, Analysis, Record, Study

PEERS = ("lightly.update_momentum", "timm ModelEmaV3", "torch AveragedModel (ema)")
OURS = "ssl_ema.EMA"
FLAT = "flat lerp_ (reference)"


def _quadratic_rows(result: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """(rule, κ) -> the larger of the EMA's loss and mean deviations from κ = 1."""
    return {(r["rule"], r["kappa"]): max(r["loss_dev"], r["mean_dev"]) for r in result["rows"]}


def quadratic_rule(variants: Mapping[str, str], judged: Sequence[int] = (8, 16)) -> AnalysisFn:
    """Busbridge et al. Sec. 3 on the noisy quadratic: with the rule every κ's EMA deviates from
    κ = 1 by at most the tool's tolerance; without it (``optimizer``: ρ kept) the EMA at each
    κ in ``judged`` deviates by at least separation × tolerance. ``variants``: name -> label."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records)
        missing = [n for n in variants if not runs.get(n)]
        if missing:
            return Analysis(TOO_FEW, f"runs missing: {', '.join(missing)}")
        rows = ["| variant | κ | lr | ρ with the rule | EMA deviation, rule `ema` | "
                "rule `optimizer` (ρ kept) | rule `none` |", "|---|---|---|---|---|---|---|"]
        ok, worst_with, least_without = True, 0.0, float("inf")
        for name, label in variants.items():
            rec = runs[name][0]
            tol, sep = rec["config"]["tolerance"], rec["config"]["separation"]
            dev = _quadratic_rows(rec["result"])
            params = {r["kappa"]: (r["lr"], r["momentum"]) for r in rec["result"]["rows"]
                      if r["rule"] == "ema"}
            for k in sorted(params)[1:]:
                cells = [f"{dev[rule, k]:.4f}" if (rule, k) in dev else "" for rule in
                         ("ema", "optimizer", "none")]
                rows.append(f"| {label} | {k} | {params[k][0]:.4g} | {params[k][1]:.4f} | "
                            + " | ".join(cells) + " |")
            with_rule = max(v for (rule, _), v in dev.items() if rule == "ema")
            without = min(dev["optimizer", k] for k in judged)
            ok &= with_rule <= tol and without >= sep * tol
            worst_with, least_without = max(worst_with, with_rule), min(least_without, without)
        summary = (f"largest deviation of the EMA from κ = 1 with the rule {worst_with:.4f} "
                   f"(tolerance {tol:g}); without it at least {least_without:.4f} at κ = "
                   f"{', '.join(map(str, judged))} (needed {sep:g} × {tol:g}); deviation: the "
                   "largest gap between replica-mean curves over samples seen, divided by the "
                   "κ = 1 curve's maximum.")
        return Analysis(HOLDS if ok else FAILS, summary, tuple(rows))

    return analyse


def _ema_rows(rec: Record) -> tuple[list[str], bool, float]:
    """bench_ema's timings: table rows, whether ours beats every peer, the least speed-up."""
    rows, ok, least = [], True, float("inf")
    for model in rec["result"]["results"]:
        for k in sorted({r["k"] for r in model["rows"]}):
            ms = {r["implementation"]: r["ms"] for r in model["rows"]
                  if r["k"] == k and r["ms"] is not None}
            peers = [ms[p] for p in PEERS if p in ms]
            speedup = min(peers) / ms[OURS]
            ok &= speedup > 1.0
            least = min(least, speedup)
            rows.append(f"| {model['model']} | {k} | **{ms[OURS]:.3g}** | {ms.get(FLAT, 0):.3g} | "
                        + " | ".join(f"{ms[p]:.3g}" if p in ms else "-" for p in PEERS)
                        + f" | {speedup:.2f}× |")
    return rows, ok, least


def throughput(ema: str | None = "ema", train: str | None = None, vs_loader: float = 4.0,
               vs_bound: float = 0.85) -> AnalysisFn:
    """README's speed claims: our EMA update beats lightly's, timm's and torch's (ms per update,
    ``ema`` variant: tools/bench_ema.py); our device pipeline trains at least ``vs_loader`` × a
    lightly-style loader and ``vs_bound`` × the compute bound (``train``: tools/bench_train.py)."""

    def analyse(study: Study, records: Sequence[Record]) -> Analysis:
        runs = by_variant(records)
        missing = [n for n in (ema, train) if n and not runs.get(n)]
        if missing:
            return Analysis(TOO_FEW, f"runs missing: {', '.join(missing)}")
        table, parts, ok = [], [], True
        if ema:
            rows, fast, least = _ema_rows(runs[ema][0])
            table += ["| model | K | ours (ms) | flat `lerp_` | " + " | ".join(PEERS)
                      + " | fastest peer / ours |", "|---|---|---|---|---|---|---|---|", *rows, ""]
            ok &= fast
            parts.append(f"our EMA update is {least:.2f}× the fastest peer at worst "
                         f"({runs[ema][0]['device']})")
        if train:
            m = runs[train][0]["metrics"]
            loader, bound = m["ours"] / m["loader_and_step"], m["ours"] / m["compute_bound"]
            table += ["| ours (images/s) | lightly-style loader + step | compute bound | "
                      "ours / loader | ours / bound |", "|---|---|---|---|---|",
                      f"| {m['ours']:,.0f} | {m['loader_and_step']:,.0f} | "
                      f"{m['compute_bound']:,.0f} | {loader:.2f}× | {bound:.2f}× |"]
            ok &= loader >= vs_loader and bound >= vs_bound
            parts.append(f"training {m['ours']:,.0f} images/s, {loader:.2f}× the lightly-style "
                         f"loader (needed {vs_loader:g}×) and {bound:.2f}× the compute bound "
                         f"(needed {vs_bound:g}×) ({runs[train][0]['device']})")
        return Analysis(HOLDS if ok else FAILS, "; ".join(parts) + ".", tuple(table))

    return analyse
