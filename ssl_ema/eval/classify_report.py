"""The end-of-run tables of a classification run: top-1 of the last iterate against each EMA,
their calibration on the test split (ECE, NLL; validation values are in metrics.jsonl), and the
EMA early-stopping choice.

Each EMA is named by its momentum per optimizer step at the reference batch (as in the recipe)
and per update (``** ema.period``: the paper's alpha, e.g. 0.99797 every 16 steps = 0.968).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssl_ema.eval.classify import ClassifierEvaluation

COLUMNS = [("val", "val"), ("val_bn", "val+BN"), ("test", "test"), ("test_bn", "test+BN")]


def _label(name: str, evaluation: ClassifierEvaluation) -> str:
    cfg = evaluation.trainer.cfg
    if name == "student":
        return "last iterate (student)"
    momentum = cfg.method.momentum if name == "teacher" else float(name.removeprefix("ema_"))
    per_update = momentum ** cfg.ema.period
    return f"{name} ({momentum:.5g}, {per_update:.4g}/upd)" if cfg.ema.period > 1 else \
        f"{name} ({momentum:.5g})"


def _choice(kind: str, c: dict[str, Any]) -> str:
    bn = ", BN recomputed" if c["bn_recomputed"] else ""
    return (f"best {kind} on validation: {c['model']}{bn} at epoch {c['epoch']} "
            f"(step {c['step']}): val {c['val']:.4f}, test {c['test']:.4f}")


def classification_table(result: dict[str, Any], evaluation: ClassifierEvaluation) -> str:
    trainer = evaluation.trainer
    cols = [(k, title) for k, title in COLUMNS
            if f"acc_student_{k}" in result]
    n_bn = trainer.cfg.ema.recompute_bn_batches
    lines = [f"top-1 accuracy after {int(result['step'])} steps on "
             + ", ".join(f"{len(loader.dataset)} {split}"  # type: ignore[arg-type]
                         for split, loader in evaluation.splits.items())
             + f" {trainer.cfg.data.dataset} images"
             + (f" (+BN: statistics recomputed on {n_bn} training batches)" if n_bn else ""),
             f"  {'model':<36}" + "".join(f" {title:>8}" for _, title in cols)]
    for name, _ in evaluation.models():
        row = [result.get(f"acc_{name}_{k}") for k, _ in cols]
        lines.append(f"  {_label(name, evaluation):<36}"
                     + "".join(f" {v:>8.4f}" for v in row if v is not None))
    lines += _calibration_rows(result, evaluation)
    if "mask_rate" in result:
        masked = result.get("pseudo_label_accuracy", float("nan"))
        lines.append(f"pseudo-labels in the last epoch: mask rate {result['mask_rate']:.3f}, "
                     f"accuracy {masked:.4f} (above tau), "
                     f"{result['pseudo_label_accuracy_all']:.4f} (all)")
    for kind in ("ema", "student"):
        if f"best_{kind}" in result:
            lines.append(_choice("EMA" if kind == "ema" else "last iterate",
                                 result[f"best_{kind}"]))
    return "\n".join(lines)


def _calibration_rows(result: dict[str, Any], evaluation: ClassifierEvaluation) -> list[str]:
    """A second, compact table: ECE-15 and NLL on test, own and recomputed BN statistics."""
    cols = [(f"{metric}_{{}}_{split}", title) for split, bn in (("test", ""), ("test_bn", "+BN"))
            for metric, title in (("ece", f"ECE{bn}"), ("nll", f"NLL{bn}"))]
    cols = [(key, title) for key, title in cols if key.format("student") in result]
    if not cols:
        return []
    n_test = len(evaluation.splits["test"].dataset)  # type: ignore[arg-type]
    lines = [f"calibration on {n_test} test images (ECE: 15 equal-mass bins; NLL: nats)",
             f"  {'model':<36}" + "".join(f" {title:>8}" for _, title in cols)]
    for name, _ in evaluation.models():
        lines.append(f"  {_label(name, evaluation):<36}"
                     + "".join(f" {result[key.format(name)]:>8.4f}" for key, _ in cols))
    return lines
