"""The one training loop, for every method, on Hugging Face Accelerate.

`Trainer.train_epoch` is the loop, top to bottom: micro-batches (gradient accumulation) ->
optimizer step -> once per optimizer step (every ``ema.period`` steps): teacher momentum from the
schedule (a function of samples seen), raised to kappa * period -> EMA update of the teacher and
the EMA copies on the unwrapped modules -> counters -> the post-hoc EMA's power EMAs and snapshots
(``ema.posthoc``, `engine.posthoc`) -> metrics -> stop signals and checkpoints.
Each epoch runs at the batch of ``train.batch_schedule`` with hyperparameters resolved for its
kappa (progressive scaling, Busbridge et al. 2023, Alg. 1). `fit` wraps it: the evaluation before
training, every ``eval.every_epochs`` and at the end, and the final checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ssl_ema.config import Config, ConfigError
from ssl_ema.data.datasets import DataBundle, check_knn_bank
from ssl_ema.ema import EMA
from ssl_ema.engine.accelerator import build_accelerator
from ssl_ema.engine.checkpoint import everyone, load_checkpoint, save_checkpoint
from ssl_ema.engine.guard import NonFiniteGuard
from ssl_ema.engine.header import header_text, run_header, write_run_files
from ssl_ema.engine.loaders import (
    Stream,
    TrainBatches,
    build_run_data,
    per_device_batch,
    prepare,
    worker_warning,
)
from ssl_ema.engine.optim import (
    build_optimizer,
    scheduled_lr_and_weight_decay,
    set_lr_and_weight_decay,
)
from ssl_ema.engine.posthoc import STATE_FILE as POSTHOC_STATE
from ssl_ema.engine.posthoc import build_posthoc, describe, load_state, state_bytes
from ssl_ema.engine.rollback import InFlight, Rollback
from ssl_ema.engine.scaled import ScaledHyperparams, resolve
from ssl_ema.engine.state import TrainState
from ssl_ema.engine.stop import Stopped, StopPoints, StopSignals, signal_name
from ssl_ema.engine.trackers import TrackerMirror, start_trackers
from ssl_ema.engine.tracking import MetricsLog
from ssl_ema.eval.context import EvalContext
from ssl_ema.eval.evaluations import Evaluation, build_evaluation
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.registry import build_method
from ssl_ema.models.backbones import given_backbone
from ssl_ema.models.custom import BackboneSource, backbone_builder
from ssl_ema.schedules import batch_at_epoch


class RunFinished(Exception):
    """``--resume`` of a run that has already finished: nothing is done or written."""


def _build(cfg: Config, data: DataBundle, device: torch.device, world: int,
           backbone: BackboneSource | None, num_features: int | None) -> TeacherStudentMethod:
    """The registered method on the recipe's backbone (or the one given from Python), with
    synchronised BatchNorm and the channels-last layout where the recipe asks for them."""
    build = None if backbone is None else backbone_builder(
        backbone, data.in_chans, cfg.data.image_size, num_features)
    with given_backbone(build):
        method = build_method(cfg, data.in_chans, data.num_classes)
    if cfg.train.sync_batchnorm and world > 1:
        if device.type != "cuda":
            raise ConfigError("train.sync_batchnorm needs CUDA devices (NCCL); set it to "
                              "false on CPU")
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    return method


class Trainer:
    """Builds everything from a :class:`Config` and runs `fit`; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None,
                 stop_at: float | None = None, *, data: DataBundle | None = None,
                 backbone: BackboneSource | None = None, num_features: int | None = None,
                 given: dict[str, str] | None = None):
        """``data`` (`ssl_ema.data.custom.given_data`) and ``backbone`` (a module or a function
        building one, with ``num_features`` unless it has the attribute:
        `ssl_ema.models.custom`) replace the recipe's data set and timm model; ``given`` names
        them in the run header (`ssl_ema.engine.from_python.train` sets them all)."""
        self.cfg, self.run_dir, self.resume_from = cfg, run_dir, resume_from
        self.given = given or {}
        self.accelerator = build_accelerator(cfg, run_dir)
        set_seed(cfg.run.seed)
        world = self.accelerator.num_processes
        self.batches = sorted({batch_at_epoch(e, cfg.train.batch_size, cfg.train.batch_schedule)
                               for e in range(cfg.train.epochs)})
        self.per_device = {b: per_device_batch(cfg, world, b) for b in self.batches}
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # data errors surface before any model is built, and before any warning
        self.data: DataBundle = build_run_data(cfg, data)
        check_knn_bank(cfg, self.data)
        if (note := worker_warning(cfg.data.num_workers, local)) and \
                self.accelerator.is_local_main_process:
            print(note, file=sys.stderr)
        method = _build(cfg, self.data, self.accelerator.device, world, backbone, num_features)
        self.scaled: dict[int, ScaledHyperparams] = {b: resolve(cfg, b) for b in self.batches}
        method.to(self.accelerator.device)  # before the optimizer: fused kernels need it there
        optimizer = build_optimizer(method.student, cfg.optim, self.hyper(0).optimizer.lr.value)
        self.on_device = cfg.data.pipeline == "device"
        self.method, self.optimizer, self.train_loaders, self.bank_loader, self.query_loader, \
            self.val_loader = prepare(self.accelerator, method, optimizer, self.data, cfg,
                                      self.per_device)
        # torch.compile wraps the prepared (DDP) module for the forward only, so checkpoints,
        # `accumulate` and the EMA see the plain modules.
        self.forward = torch.compile(self.method) if cfg.train.compile else self.method
        # The unwrapped method, looked up once: the EMA and the method hooks use it every step.
        self.model: TeacherStudentMethod = self.accelerator.unwrap_model(self.method)
        self.ema = EMA(self.model.student_for_ema(), [self.model.teacher, *self.model.ema_copies],
                       buffers=cfg.ema.buffers, fused=cfg.ema.fused)
        # Power EMAs of the student for a post-hoc choice of the EMA length (ema.posthoc).
        acc = self.accelerator
        self.posthoc = build_posthoc(cfg, self.model.student_for_ema(), run_dir,
                                     self.total_samples, acc.is_main_process,
                                     partial(everyone, acc) if acc.num_processes > 1 else None)
        # The method names its evaluation (kNN of features, or top-1 of its classifier).
        self.evaluation: Evaluation = build_evaluation(self.eval_context())
        self.state = TrainState()
        self.log = MetricsLog(run_dir / "metrics.jsonl", self.accelerator.is_main_process,
                              TrackerMirror(self.accelerator) if cfg.run.log_with else None)
        self._mark()
        gather = self.accelerator.gather
        self.guard = NonFiniteGuard(
            cfg.train.nonfinite == "fail",
            (lambda x: gather(x[None]).min()) if self.accelerator.num_processes > 1 else None,
        )
        # One process: a stop signal interrupts the step or evaluation in flight, which is rolled
        # back (engine/stop.py, engine/rollback.py); so is a non-finite step under `skip`.
        self.signals = StopSignals(interrupt=self.accelerator.num_processes == 1)
        self.flight = InFlight(self.signals, Rollback(
            self.model, self.accelerator, self.guard, self.optimizer, self.signals.interrupt))
        self.stops = StopPoints(
            self.signals, cfg.train.checkpoint_every_minutes, cfg.train.log_every,
            (lambda x: gather(x[None]).amax(0)) if self.accelerator.num_processes > 1 else None,
            self.accelerator.device, stop_at)  # stop_at: tools/train.py --stop-after

    # ----------------------------------------------------------------------------- batch sizes
    def batch_size(self, epoch: int) -> int:
        """Effective batch during ``epoch`` (``train.batch_schedule``)."""
        cfg = self.cfg.train
        return batch_at_epoch(min(epoch, cfg.epochs - 1), cfg.batch_size, cfg.batch_schedule)

    def hyper(self, epoch: int) -> ScaledHyperparams:
        return self.scaled[self.batch_size(epoch)]

    def train_loader(self, epoch: int) -> TrainBatches:
        return self.train_loaders[self.batch_size(epoch)]

    @cached_property
    def total_samples(self) -> int:
        world = self.accelerator.num_processes
        return sum(len(self.train_loader(e)) * self.per_device[self.batch_size(e)] * world
                   for e in range(self.cfg.train.epochs))

    @cached_property
    def total_steps(self) -> int:
        acc = self.cfg.train.grad_accumulation
        epochs = range(self.cfg.train.epochs)
        steps = sum(math.ceil(len(self.train_loader(e)) / acc) for e in epochs)
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    # ----------------------------------------------------------------------------- training
    def train_epoch(self, bar: tqdm | None = None) -> bool:
        """One pass over this epoch's data (from ``batch_in_epoch`` on a resume); True if the
        epoch completed (False when ``total_steps`` came first)."""
        hyper, batches, epoch_batches = self._epoch_batches()
        self.train_on(batches, hyper, epoch_batches, bar)
        return self.state.batch_in_epoch == 0

    def train_on(self, batches: Iterable[Any], hyper: ScaledHyperparams, epoch_batches: int,
                 bar: tqdm | None = None) -> None:
        """The loop: micro-batches of an epoch of ``epoch_batches`` at ``hyper``'s batch size,
        one optimizer step at a time, to the logged metrics, until ``total_steps``. No host sync
        outside log points, except one per step under ``train.nonfinite=skip``
        (`tools/bench_train.py` counts them). A stop signal that interrupts a step rolls it
        back and checkpoints the step before."""
        with self.flight.interruptible(lambda signum: self._stop(signum, False, "step")):
            self._steps(batches, hyper, epoch_batches, bar)

    def _steps(self, batches: Iterable[Any], hyper: ScaledHyperparams, epoch_batches: int,
               bar: tqdm | None) -> None:
        acc, cfg, st, model = self.accelerator, self.cfg, self.state, self.model
        micro = 0
        self.flight.begin()
        for batch in batches:
            micro += 1
            with acc.accumulate(self.method):
                # -------- forward and backward of one micro-batch
                progress = st.samples_seen / self.total_samples
                model.prepare_step(progress, hyper.momentum)
                out = self.forward(batch)
                self.guard.observe(out["loss"], st.step + 1, st.epoch)
                acc.backward(out["loss"])
                if not acc.sync_gradients:
                    continue  # accumulating
                self.flight.commit()  # from here on the step finishes, whatever arrives
                # -------- optimizer step, unless a loss was NaN/inf under train.nonfinite=skip
                finite = self.guard.all_finite()
                momentum = model.momentum(progress)
                if finite:
                    lr, wd = scheduled_lr_and_weight_decay(
                        cfg.optim, cfg.train.epochs, hyper.optimizer.lr.value, progress, st.epoch)
                    set_lr_and_weight_decay(self.optimizer, lr, wd)
                    grad_norm = self._clip_gradients()
                    model.before_optimizer_step()
                    self.optimizer.step()
                    sched = {"lr": lr, "weight_decay": wd, "momentum_base": momentum}
                    if grad_norm is not None:
                        sched["grad_norm"] = grad_norm
                else:  # dropped: no update, no EMA step, the forward's buffer changes undone
                    self.flight.rollback.restore_buffers()
                    sched = {"lr": self.optimizer.param_groups[0]["lr"], "momentum_base": momentum}
                self.optimizer.zero_grad(set_to_none=True)
                # -------- EMA: once per optimizer step (every `period`), on the unwrapped
                # modules (all ranks hold the same student). Momenta are per step at the
                # reference batch -> warm-up -> ** (kappa * period): `ssl_ema.momentum`.
                if finite and (st.step + 1) % cfg.ema.period == 0:
                    momenta = [hyper.momentum.per_update(m, st.samples_seen).value
                               for m in (momentum, *cfg.ema.extra_momenta)]
                    self.ema.update(momenta)
                    sched["momentum"] = momenta[0]
            # -------- counters: the one place they advance
            images, epoch = micro * self.per_device[hyper.batch] * acc.num_processes, st.epoch
            st.advance(micro, images, epoch_batches, skipped=not finite)
            micro = 0
            if self.posthoc is not None:  # in samples seen: a skipped step's student stays
                self.posthoc.step(st.samples_seen)
            # -------- metrics, then stop signals / deadline and checkpoints
            if not finite:
                self.log.write({"event": "skipped", "step": st.step, "epoch": epoch,
                                "skipped_steps": st.skipped_steps})
            if bar is not None:
                bar.update(1)
            self._log_step(out, {**sched, "batch": images}, bar)
            self._stop_or_checkpoint()
            if st.step >= self.total_steps:
                break
            if st.batch_in_epoch:  # at an epoch's end the next begin (evaluation, epoch) acts
                self.flight.begin()

    def _epoch_batches(self) -> tuple[ScaledHyperparams, Iterable[Any], int]:
        """The epoch's hyperparameters (applied), its remaining batches, its length."""
        st = self.state
        hyper, loader = self.hyper(st.epoch), self.train_loader(st.epoch)
        hyper.apply(self.optimizer, [self.model])
        loader.set_epoch(st.epoch)  # data order: a function of (seed, epoch)
        self.data.train.set_epoch(st.epoch)  # augmentations: of (seed, epoch, index)
        if isinstance(loader, Stream):  # any device stream
            return hyper, loader.iter_from(st.batch_in_epoch), len(loader)
        if st.batch_in_epoch:
            return hyper, self.accelerator.skip_first_batches(loader, st.batch_in_epoch), \
                len(loader)
        return hyper, loader, len(loader)

    def _clip_gradients(self) -> torch.Tensor | None:
        """Clip the student's gradient norm (DINO, Caron et al. 2021); the norm before clipping."""
        max_norm = self.cfg.optim.clip_grad_norm
        if max_norm <= 0:
            return None
        return self.accelerator.clip_grad_norm_(self.model.student.parameters(), max_norm)

    def _log_step(self, out: dict[str, torch.Tensor], sched: dict[str, Any],
                  bar: tqdm | None) -> None:
        """Every ``train.log_every`` steps and at the last: the step's record in metrics.jsonl."""
        st = self.state
        if st.step % self.cfg.train.log_every and st.step != self.total_steps:
            return
        self.guard.check(self.run_dir)
        metrics = {k: float(v.detach()) for k, v in out.items()}  # host sync only here
        sched = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                 for k, v in sched.items()}
        # Throughput since the last log line: the step itself runs ahead of the host.
        (t, seen), now = self._log_mark, time.perf_counter()
        self.log.write({"event": "train", "step": st.step, "epoch": st.epoch,
                        "samples_seen": st.samples_seen, **metrics, **sched,
                        "images_per_s": (st.samples_seen - seen) / max(now - t, 1e-9)})
        self._mark()
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{sched['lr']:.3g}",
                            momentum=f"{sched['momentum_base']:.4f}", refresh=False)

    def _stop_or_checkpoint(self) -> None:
        st = self.state
        signum, late, clock_due = self.stops.check(st.step)
        if signum or late:
            self._stop(signum)
        every = self.cfg.train.checkpoint_every
        if ((every and st.step % every == 0) or clock_due) and st.step < self.total_steps:
            self._save()

    def _stop(self, signum: int, eval_pending: bool | None = None, interrupted: str = "") -> None:
        """A stop signal (``signum``) or the deadline (``signum`` 0) reached this step on some
        process: checkpoint, then stop every rank. ``eval_pending``: the evaluation after this
        step is still to run (default: an epoch ended here and its evaluation is due);
        ``interrupted``: the "step" or "evaluation" the signal interrupted and rolled back."""
        st = self.state
        if eval_pending is None:
            eval_pending = st.batch_in_epoch == 0 and self._more() and self._eval_due(st.epoch)
        path = self._save({"eval_pending": eval_pending})
        cause = signal_name(signum) if signum else "deadline"
        self.log.write({"event": "stopped", "signal": cause, "step": st.step, "epoch": st.epoch,
                        **({"interrupted": interrupted} if interrupted else {})})
        raise Stopped.at(signum, st.step, st.epoch, path, self.run_dir)

    # ----------------------------------------------------------------------------- evaluation
    def eval_context(self) -> EvalContext:
        """What the method's evaluation reads: models, loaders, accelerator, config."""
        held_out = {} if self.data.val_eval is None else {"val": len(self.data.val_eval)}
        held_out["test"] = len(self.data.test_eval)  # type: ignore[arg-type]
        return EvalContext(model=self.model, cfg=self.cfg, accelerator=self.accelerator,
                           bank=self.bank_loader, query=self.query_loader, val=self.val_loader,
                           num_classes=self.data.num_classes, held_out=held_out,
                           gather=not self.on_device, run_dir=self.run_dir)

    def evaluate(self) -> dict[str, float]:
        """The method's evaluation of teacher, student and EMA copies on held-out data."""
        return self.evaluation.evaluate(self.state.epoch, self.state.step)

    def _eval_due(self, epoch_done: int) -> bool:
        every = self.cfg.eval.every_epochs
        return every > 0 and epoch_done % every == 0

    def _log_eval(self, pending: bool = True) -> dict[str, float]:
        """Evaluate and log. A stop signal (one process) interrupts the evaluation, which is
        rolled back, and the run stops; ``pending``: a resume runs it first (the evaluations
        before training and at the end run again on resume anyway)."""
        self.guard.check(self.run_dir)
        saved = self.evaluation.state_dict()

        def stop(signum: int) -> None:
            self.evaluation.load_state_dict(saved)
            self._stop(signum, pending, "evaluation")

        with self.flight.interruptible(stop):
            self.flight.begin()
            result = self.evaluate()
            self.flight.commit()  # inside: a signal from here on waits for the next begin
        st = self.state
        self.log.write({"event": "eval", "step": st.step, "epoch": st.epoch,
                        "samples_seen": st.samples_seen, **result})
        self._mark()
        return result

    # ----------------------------------------------------------------------------- run
    def fit(self) -> dict[str, float]:
        """Train to the end (or max_steps), evaluate, checkpoint; return the final metrics.
        Raises :class:`Stopped` after checkpointing when a stop signal arrives or the
        deadline passes."""
        acc, st = self.accelerator, self.state
        with self.signals:
            eval_pending = self._resume() if self.resume_from is not None else False
            self._write_header()
            start_trackers(acc, self.cfg, self.run_dir)
            self._mark()
            if st.step == 0 and st.knn_random < 0:
                # before training: student == teacher == random init
                st.knn_random = self._log_eval(pending=False)[self.evaluation.baseline_key]
            elif eval_pending:  # stopped right after an epoch whose evaluation was due
                self._log_eval()
            self.stops.saved()
            self.method.train()
            with tqdm(total=self.total_steps, initial=st.step, disable=not acc.is_main_process,
                      desc="train", dynamic_ncols=True,
                      mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
                while self._more():
                    if self.train_epoch(bar) and self._more() and self._eval_due(st.epoch):
                        self._log_eval()  # during training, every eval.every_epochs
            if self.posthoc is not None:
                self.posthoc.finish()  # the last averages, unless the last step stored them
            result = self._log_eval(pending=False)  # the final evaluation, always
            self._save()
        final = {self.evaluation.baseline_name: st.knn_random, **result, "step": st.step,
                 "samples_seen": st.samples_seen, "skipped_steps": st.skipped_steps,
                 **self.evaluation.summary(), **self._decode_fallbacks()}
        if acc.is_main_process:
            (self.run_dir / "results.json").write_text(json.dumps(final, indent=2) + "\n")
        return final

    def _decode_fallbacks(self) -> dict[str, int]:
        """data.pipeline=jpeg: files its decoder refused and a CPU decoder read, all ranks."""
        counts = [getattr(s, "decode_fallbacks", None) for s in self.train_loaders.values()]
        if self.cfg.data.pipeline != "jpeg" or None in counts:
            return {}
        count = torch.tensor(sum(counts), device=self.accelerator.device)
        return {"decode_fallbacks": int(self.accelerator.reduce(count, "sum"))}

    def _more(self) -> bool:
        return self.state.epoch < self.cfg.train.epochs and self.state.step < self.total_steps

    def _write_header(self) -> None:
        first = self.hyper(0)
        world = self.accelerator.num_processes
        h = run_header(self.cfg, self.accelerator, self.model.student, self.data, first,
                       self.scaled, self.per_device, self.total_steps, self.total_samples,
                       {b: len(self.train_loaders[b]) * self.per_device[b] * world
                        for b in self.batches})
        if self.given:  # objects from Python in place of data.dataset / model.backbone
            h["given"] = self.given
        if self.posthoc is not None:  # its disk cost, logged once per start
            h["posthoc_ema"] = describe(self.posthoc, self.total_samples)
        if self.accelerator.is_main_process:
            write_run_files(self.run_dir, self.cfg, h)
            print(header_text(h, self.scaled, self.per_device, self.data, self.run_dir))
        resumed = {"resumed_from": self.state.step} if self.resume_from is not None else {}
        self.log.write({"event": "header", **h, **resumed})

    def _mark(self) -> None:
        self._log_mark = (time.perf_counter(), self.state.samples_seen)

    def _save(self, extra: dict[str, Any] | None = None) -> Path:
        self.guard.check(self.run_dir)
        path = save_checkpoint(self.accelerator, self.run_dir, self.state.step,
                               self.cfg.train.keep_checkpoints,
                               {"train": self.state.state_dict(), "ema": self.ema.state_dict(),
                                "evaluation": self.evaluation.state_dict(), **(extra or {})},
                               {} if self.posthoc is None else
                               {POSTHOC_STATE: state_bytes(self.posthoc)})
        self.stops.saved()
        self._mark()
        return path

    def _resume(self) -> bool:
        """Load the checkpoint and drop the metrics written after it; whether the evaluation of
        the epoch it ended is still to run. Raises RunFinished for a run that has finished."""
        assert self.resume_from is not None
        st = self.state
        counters = load_checkpoint(self.accelerator, self.resume_from)
        st.load_state_dict(counters["train"])
        self.ema.load_state_dict(counters["ema"])
        if self.posthoc is not None:
            load_state(self.posthoc, self.resume_from)
        self.evaluation.load_state_dict(counters.get("evaluation", {}))
        results = self.run_dir / "results.json"
        if st.step >= self.total_steps and results.is_file():
            raise RunFinished(f"run {self.run_dir} finished at step {st.step} ({results}); "
                              "nothing to do")
        # Records after the checkpoint are written again; so is the final evaluation.
        self.log.keep_until(st.step, drop_eval_at_step=st.step >= self.total_steps)
        return bool(counters.get("eval_pending", False))
