"""The one training loop, for every method, on Hugging Face Accelerate.

Per optimizer step: (micro-batches with gradient accumulation) -> optimizer step -> once
(every ``ema.period`` steps): teacher momentum from the schedule (a function of samples seen),
raised to kappa * period -> EMA update of the teacher and the EMA copies on the unwrapped modules
-> metrics. Each epoch runs at the batch of ``train.batch_schedule`` with hyperparameters resolved
for its kappa (progressive scaling, Busbridge et al. 2023, Alg. 1). kNN evaluation of teacher,
student and EMA copies every few epochs, and a checkpoint every N steps and at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssl_ema.config import Config, ConfigError, dump_yaml
from ssl_ema.data.datasets import DataBundle, build_data
from ssl_ema.data.device import TrainStream, device_streams
from ssl_ema.data.synthetic_noise import describe_noise
from ssl_ema.ema import EMA
from ssl_ema.engine.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from ssl_ema.engine.guard import NonFiniteGuard, NonFiniteLoss
from ssl_ema.engine.optim import build_optimizer
from ssl_ema.engine.run import cpu_processes
from ssl_ema.engine.scaled import ScaledHyperparams, resolve
from ssl_ema.engine.stop import DEADLINE_EXIT, Stopped, StopPoints, StopSignals, signal_name
from ssl_ema.engine.tracking import MetricsLog, device_name, git_sha, versions
from ssl_ema.eval.evaluations import Evaluation, build_evaluation
from ssl_ema.methods import TeacherStudentMethod, build_method
from ssl_ema.schedules import batch_at_epoch, cosine, warmup_cosine


@dataclass
class TrainState:
    """Counters that, with the seed, determine every schedule; saved in each checkpoint."""

    step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    knn_random: float = -1.0  # baseline: the random-init student's score (kNN or top-1)
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss (train.nonfinite)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


TrainBatches = DataLoader | TrainStream


def per_device_batch(cfg: Config, world_size: int, batch: int | None = None) -> int:
    """Split an effective batch over processes and accumulation; error if it does not divide."""
    batch = cfg.train.batch_size if batch is None else batch
    div = world_size * cfg.train.grad_accumulation
    if batch % div:
        raise ConfigError(
            f"effective batch {batch} is not divisible by world size {world_size} "
            f"x train.grad_accumulation {cfg.train.grad_accumulation}; pick a multiple of {div}"
        )
    return batch // div


class RunFinished(Exception):
    """``--resume`` of a run that has already finished: nothing is done or written."""


class Trainer:
    """Builds everything from a :class:`Config` and runs `fit`; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None,
                 stop_at: float | None = None):
        self.cfg, self.run_dir, self.resume_from = cfg, run_dir, resume_from
        self.accelerator = Accelerator(
            cpu=cpu_processes(),
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accumulation,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(cfg.run.seed)
        if self.accelerator.device.type == "cuda":
            # Fixed shapes: let cuDNN pick its fastest kernels; TF32 for the fp32 matmuls.
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        if self.accelerator.device.type == "cpu":
            # `accelerate launch` sets OMP_NUM_THREADS=1; share this machine's cores instead,
            # unless SSL_EMA_CPU_THREADS says how many (on a machine other jobs load, threads
            # that wait for each other's cores make each step several times slower).
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
            threads = int(os.environ.get("SSL_EMA_CPU_THREADS", "0"))
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
        world = self.accelerator.num_processes
        self.batches = sorted({batch_at_epoch(e, cfg.train.batch_size, cfg.train.batch_schedule)
                               for e in range(cfg.train.epochs)})
        self.per_device = {b: per_device_batch(cfg, world, b) for b in self.batches}
        self.data: DataBundle = build_data(cfg)  # data errors surface before any model is built
        method = build_method(cfg, self.data.in_chans, self.data.num_classes)
        if cfg.train.sync_batchnorm and world > 1:
            if self.accelerator.device.type != "cuda":
                raise ConfigError("train.sync_batchnorm needs CUDA devices (NCCL); set it to "
                                  "false on CPU")
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        if cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
        self.scaled: dict[int, ScaledHyperparams] = {b: resolve(cfg, b) for b in self.batches}
        method.to(self.accelerator.device)  # before the optimizer: fused kernels need it there
        optimizer = build_optimizer(method.student, cfg.optim, self.hyper(0).optimizer.lr.value)
        self.on_device = cfg.data.pipeline == "device"
        self.train_loaders: Mapping[int, TrainBatches]
        if self.on_device:  # already on the device and sharded: nothing for Accelerate to wrap
            self.method, self.optimizer = self.accelerator.prepare(method, optimizer)
            acc = self.accelerator
            self.train_loaders, self.bank_loader, self.query_loader = device_streams(
                self.data, cfg, self.per_device, acc.device, acc.process_index, world)
        else:
            train_loaders, bank, query = self._loaders()
            self.method, self.optimizer, self.bank_loader, self.query_loader, *loaders = (
                self.accelerator.prepare(method, optimizer, bank, query, *train_loaders)
            )
            self.train_loaders = dict(zip(self.batches, loaders))
        # torch.compile wraps the prepared (DDP) module for the forward only, so checkpoints,
        # `accumulate` and the EMA see the plain modules.
        self.forward = torch.compile(self.method) if cfg.train.compile else self.method
        # The unwrapped method, looked up once: the EMA and the method hooks use it every step.
        self.model: TeacherStudentMethod = self.accelerator.unwrap_model(self.method)
        self.ema = EMA(self.model.student_for_ema(), [self.model.teacher, *self.model.ema_copies],
                       buffers=cfg.ema.buffers, fused=cfg.ema.fused)
        # The method names its evaluation (kNN of features, or top-1 of its classifier).
        self.evaluation: Evaluation = build_evaluation(self)
        self.state = TrainState()
        self.log = MetricsLog(run_dir / "metrics.jsonl", self.accelerator.is_main_process)
        gather = self.accelerator.gather
        self.guard = NonFiniteGuard(
            cfg.train.nonfinite == "fail",
            (lambda x: gather(x[None]).min()) if self.accelerator.num_processes > 1 else None,
        )
        self.signals = StopSignals()
        self.stops = StopPoints(
            self.signals, cfg.train.checkpoint_every_minutes, cfg.train.log_every,
            (lambda x: gather(x[None]).amax(0)) if self.accelerator.num_processes > 1 else None,
            self.accelerator.device, stop_at)  # stop_at: tools/train.py --stop-after

    # ----------------------------------------------------------------------------- set-up
    def _loaders(self) -> tuple[list[DataLoader], DataLoader, DataLoader]:
        workers = self.cfg.data.num_workers
        common: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0,
                                  "pin_memory": torch.cuda.is_available()}
        train = []
        for b in self.batches:
            loader = DataLoader(self.data.train, batch_size=self.per_device[b], shuffle=True,
                                drop_last=True, **common)
            if len(loader) == 0:
                raise ConfigError(
                    f"batch {b} exceeds the {len(self.data.train)} training images; lower it"  # type: ignore[arg-type]
                )
            train.append(loader)
        bank = DataLoader(self.data.train_eval, batch_size=256, **common)
        query = DataLoader(self.data.test_eval, batch_size=256, **common)
        return train, bank, query

    def batch_size(self, epoch: int) -> int:
        """Effective batch during ``epoch`` (``train.batch_schedule``)."""
        cfg = self.cfg.train
        return batch_at_epoch(min(epoch, cfg.epochs - 1), cfg.batch_size, cfg.batch_schedule)

    def hyper(self, epoch: int) -> ScaledHyperparams:
        return self.scaled[self.batch_size(epoch)]

    def train_loader(self, epoch: int) -> TrainBatches:
        return self.train_loaders[self.batch_size(epoch)]

    def _epoch_samples(self, epoch: int) -> int:
        b = self.batch_size(epoch)
        return len(self.train_loaders[b]) * self.per_device[b] * self.accelerator.num_processes

    @cached_property
    def total_samples(self) -> int:
        return sum(self._epoch_samples(e) for e in range(self.cfg.train.epochs))

    @cached_property
    def total_steps(self) -> int:
        acc = self.cfg.train.grad_accumulation
        epochs = range(self.cfg.train.epochs)
        steps = sum(math.ceil(len(self.train_loader(e)) / acc) for e in epochs)
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    def header(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        n_params = sum(p.numel() for p in self.model.student.parameters())
        first = self.hyper(0)
        return {
            "git": git_sha(), "versions": versions(), "device": device_name(acc.device),
            "world_size": acc.num_processes, "per_device_batch": self.per_device[first.batch],
            "grad_accumulation": cfg.train.grad_accumulation,
            "effective_batch": first.batch, "mixed_precision": cfg.train.mixed_precision,
            "reference_batch": cfg.scaling.reference_batch, "scaling_rule": cfg.scaling.rule,
            "kappa": first.kappa, "optimizer": cfg.optim.name,
            "scaled": [self.scaled[b].describe() for b in self.batches],
            "batch_schedule": [list(x) for x in cfg.train.batch_schedule],
            "ema": {"period": cfg.ema.period, "warmup": cfg.ema.warmup,
                    "buffers": cfg.ema.buffers, "extra_momenta": list(cfg.ema.extra_momenta)},
            "student_parameters": n_params, "train_images": len(self.data.train),  # type: ignore[arg-type]
            "skipped_unreadable_files": self.data.skipped_files,
            "label_noise": self.data.label_noise,
            "steps": self.total_steps, "samples": self.total_samples,
        }

    def _write_header(self) -> None:
        h = self.header()
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            (self.run_dir / "header.json").write_text(json.dumps(h, indent=2) + "\n")
            lines = [f"ssl_ema {h['git']} | torch {h['versions']['torch']} | {h['device']}"]
            for b in self.batches:
                s = self.scaled[b]
                lines.append(
                    f"batch: {h['world_size']} processes x {self.per_device[b]} per device x "
                    f"{h['grad_accumulation']} accumulation = {b} effective (reference "
                    f"{h['reference_batch']}, kappa {s.kappa:g}, rule {h['scaling_rule']}: "
                    f"momentum ** {s.ema_exponent * s.period:g})")
                lines.append("  " + "; ".join(s.optimizer.describe()) + f" ({h['optimizer']})")
            if self.data.skipped_files:
                lines.append(f"left out {self.data.skipped_files} unreadable image files "
                             "(data.corrupt=skip)")
            if self.data.label_noise:
                lines.append(describe_noise(self.data.label_noise))
            lines.append(f"{h['steps']} optimizer steps, {h['samples']} samples | "
                         f"run dir: {self.run_dir}")
            print("\n".join(lines))
        resumed = {"resumed_from": self.state.step} if self.resume_from is not None else {}
        self.log.write({"event": "header", **h, **resumed})

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """The method's evaluation of teacher, student and EMA copies on held-out data."""
        return self.evaluation.evaluate(self.state.epoch)

    def _eval_due(self, epoch_done: int) -> bool:
        every = self.cfg.eval.every_epochs
        return every > 0 and epoch_done % every == 0

    # ----------------------------------------------------------------------------- training
    def train_step(self, batch: Any, micro_batches: int, forward_exponent: float = 1.0
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """Forward and backward of one micro-batch, the ``micro_batches``-th since the last
        optimizer step; when gradients are synchronised, also the optimizer step and the EMA
        update. Returns the method's outputs and the step's schedule values (None while
        accumulating). No host sync (`tools/bench_train.py` counts them)."""
        acc, st = self.accelerator, self.state
        with acc.accumulate(self.method):
            self.model.prepare_step(st.samples_seen / self.total_samples, forward_exponent)
            out = self.forward(batch)
            self.guard.observe(out["loss"], st.step + 1, st.epoch)
            acc.backward(out["loss"])
            if not acc.sync_gradients:
                return out, None
            if self.guard.all_finite():
                return out, self._optimizer_step(micro_batches)
            return out, self._nonfinite_step(micro_batches)

    def _optimizer_step(self, micro_batches: int) -> dict[str, Any]:
        """After gradients are synchronised: lr from the schedule, step, then the EMA update."""
        cfg, st, hyper = self.cfg, self.state, self.hyper(self.state.epoch)
        progress = st.samples_seen / self.total_samples
        # optim.schedule_per_epoch: the value at the epoch's start, as a per-epoch lr scheduler
        at = st.epoch / cfg.train.epochs if cfg.optim.schedule_per_epoch else progress
        warmup = cfg.optim.warmup_epochs / cfg.train.epochs
        peak = hyper.optimizer.lr.value
        lr = warmup_cosine(peak, at, warmup, peak * cfg.optim.min_lr_ratio)
        wd = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else \
            cosine(cfg.optim.weight_decay, cfg.optim.weight_decay_end, at)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("decay", False):
                group["weight_decay"] = wd
        grad_norm = self._clip_gradients()
        self.model.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Once per optimizer step (every `period`), on the unwrapped modules: all ranks hold the
        # same student. Momenta are per step at the reference batch -> ** (kappa * period).
        base = self.model.momentum(progress)
        sched = {"lr": lr, "weight_decay": wd, "momentum_base": base}
        if grad_norm is not None:
            sched["grad_norm"] = grad_norm
        if (st.step + 1) % cfg.ema.period == 0:
            momenta = [hyper.update_momentum(m, st.samples_seen)
                       for m in (base, *cfg.ema.extra_momenta)]
            self.ema.update(momenta)
            sched["momentum"] = momenta[0]
        st.step += 1
        images = self._images(micro_batches)
        st.samples_seen += images
        return {**sched, "batch": images}

    def _images(self, micro_batches: int) -> int:
        """Images in an optimizer step of ``micro_batches`` micro-batches, over all processes."""
        per_device = self.per_device[self.batch_size(self.state.epoch)]
        return micro_batches * per_device * self.accelerator.num_processes

    def _check_finite(self) -> None:
        """Before anything is written: stop if a loss was NaN/inf (train.nonfinite=fail)."""
        bad = self.guard.first_nonfinite()
        if bad is None:
            return
        saved = checkpoints(self.run_dir)
        where = f"resume from {saved[-1]}" if saved else "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"non-finite loss at step {bad[0]} (epoch {bad[1]}); nothing was written after it; "
            f"{where} with a lower optim.lr, or set train.nonfinite=skip"
        )

    def _nonfinite_step(self, micro_batches: int) -> dict[str, Any]:
        """A NaN/inf loss in this optimizer step under train.nonfinite=skip: drop the step."""
        st = self.state
        self.optimizer.zero_grad(set_to_none=True)  # no update, no EMA step
        images = self._images(micro_batches)
        progress = st.samples_seen / self.total_samples
        st.step, st.samples_seen, st.skipped_steps = (st.step + 1, st.samples_seen + images,
                                                      st.skipped_steps + 1)
        self.log.write({"event": "skipped", "step": st.step, "epoch": st.epoch,
                        "skipped_steps": st.skipped_steps})
        momentum = self.model.momentum(progress)
        return {"lr": self.optimizer.param_groups[0]["lr"], "momentum_base": momentum,
                "batch": images}

    def _clip_gradients(self) -> torch.Tensor | None:
        """Clip the student's gradient norm (DINO, Caron et al. 2021); the norm before clipping."""
        max_norm = self.cfg.optim.clip_grad_norm
        if max_norm <= 0:
            return None
        return self.accelerator.clip_grad_norm_(self.model.student.parameters(), max_norm)

    def _train_epoch(self, bar: tqdm) -> bool:
        """One pass over the data (resuming mid-epoch if needed); True if the epoch completed."""
        acc, st = self.accelerator, self.state
        epoch_loader = self.train_loader(st.epoch)
        self.hyper(st.epoch).apply(self.optimizer, [self.model])
        epoch_loader.set_epoch(st.epoch)  # data order: a function of (seed, epoch)
        self.data.train.set_epoch(st.epoch)  # augmentations: of (seed, epoch, index)
        if isinstance(epoch_loader, TrainStream):  # any device stream (issue 20)
            loader: Iterable[Any] = epoch_loader.iter_from(st.batch_in_epoch)
        elif st.batch_in_epoch:
            loader = acc.skip_first_batches(epoch_loader, st.batch_in_epoch)
        else:
            loader = epoch_loader
        micro = 0
        forward_exponent = self.hyper(st.epoch).forward_exponent
        for batch in loader:
            micro += 1
            st.batch_in_epoch += 1
            out, sched = self.train_step(batch, micro, forward_exponent)
            if sched is None:  # accumulating
                continue
            if st.batch_in_epoch == len(epoch_loader):
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            self._after_step(out, sched, bar)
            micro = 0
            if st.step >= self.total_steps:
                break
        return st.batch_in_epoch == 0

    def _after_step(self, out: dict[str, torch.Tensor], sched: dict[str, Any], bar: tqdm) -> None:
        cfg, st = self.cfg, self.state
        bar.update(1)
        if st.step % cfg.train.log_every == 0 or st.step == self.total_steps:
            self._check_finite()
            metrics = {k: float(v.detach()) for k, v in out.items()}  # host sync only here
            sched = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                     for k, v in sched.items()}
            # Throughput since the last log line: the step itself runs ahead of the host.
            (t, seen), now = self._log_mark, time.perf_counter()
            self.log.write({"event": "train", "step": st.step, "epoch": st.epoch,
                            "samples_seen": st.samples_seen, **metrics, **sched,
                            "images_per_s": (st.samples_seen - seen) / max(now - t, 1e-9)})
            self._mark()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{sched['lr']:.3g}",
                            momentum=f"{sched['momentum_base']:.4f}", refresh=False)
        signum, late, clock_due = self.stops.check(st.step)
        if signum or late:
            self._stop(signum)
        every = cfg.train.checkpoint_every
        if ((every and st.step % every == 0) or clock_due) and st.step < self.total_steps:
            self._save()

    def _stop(self, signum: int) -> None:
        """A stop signal (``signum``) or the deadline (``signum`` 0) reached this step on some
        process: checkpoint, then stop every rank."""
        st = self.state
        cause = signal_name(signum) if signum else "deadline"
        # An epoch ended at this step and its evaluation (run after the step) is still due.
        pending = st.batch_in_epoch == 0 and self._more() and self._eval_due(st.epoch)
        path = self._save({"eval_pending": pending})
        self.log.write({"event": "stopped", "signal": cause, "step": st.step, "epoch": st.epoch})
        raise Stopped(f"stopped by {cause if signum else 'the --stop-after deadline'} at step "
                      f"{st.step} (epoch {st.epoch}), checkpoint written to {path}; continue "
                      f"with: tools/train.py --resume {self.run_dir}",
                      128 + signum if signum else DEADLINE_EXIT)

    def _mark(self) -> None:
        self._log_mark = (time.perf_counter(), self.state.samples_seen)

    def _save(self, extra: dict[str, Any] | None = None) -> Path:
        self._check_finite()
        path = save_checkpoint(self.accelerator, self.run_dir, self.state.step,
                               self.cfg.train.keep_checkpoints,
                               {"train": self.state.state_dict(), "ema": self.ema.state_dict(),
                                "evaluation": self.evaluation.state_dict(), **(extra or {})})
        self.stops.saved()
        self._mark()
        return path

    def _log_eval(self) -> dict[str, float]:
        self._check_finite()
        result = self.evaluate()
        st = self.state
        self.log.write({"event": "eval", "step": st.step, "epoch": st.epoch,
                        "samples_seen": st.samples_seen, **result})
        self._mark()
        return result

    def fit(self) -> dict[str, float]:
        """Train to the end (or max_steps), evaluate, checkpoint; return the final metrics.
        Raises :class:`Stopped` after checkpointing when a stop signal arrives or the
        deadline passes."""
        acc, st = self.accelerator, self.state
        with self.signals:
            eval_pending = self._resume() if self.resume_from is not None else False
            self._write_header()
            self._mark()
            if st.step == 0 and st.knn_random < 0:
                # student == teacher == random init
                st.knn_random = self._log_eval()[self.evaluation.baseline_key]
            elif eval_pending:  # stopped right after an epoch whose evaluation was due
                self._log_eval()
            self.stops.saved()
            self._train()
            result = self._log_eval()  # the final evaluation, always
            self._save()
        final = {self.evaluation.baseline_name: st.knn_random, **result, "step": st.step,
                 "samples_seen": st.samples_seen, **self.evaluation.summary()}
        if acc.is_main_process:
            (self.run_dir / "results.json").write_text(json.dumps(final, indent=2) + "\n")
        return final

    def _train(self) -> None:
        st = self.state
        self.method.train()
        with tqdm(total=self.total_steps, initial=st.step,
                  disable=not self.accelerator.is_main_process, desc="train",
                  dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0) as bar:
            while self._more():
                finished_epoch = self._train_epoch(bar)
                if finished_epoch and self._more() and self._eval_due(st.epoch):
                    self._log_eval()

    def _more(self) -> bool:
        return self.state.epoch < self.cfg.train.epochs and self.state.step < self.total_steps

    def _resume(self) -> bool:
        """Load the checkpoint and drop the metrics written after it; whether the evaluation of
        the epoch it ended is still to run. Raises RunFinished for a run that has finished."""
        assert self.resume_from is not None
        st = self.state
        counters = load_checkpoint(self.accelerator, self.resume_from)
        st.load_state_dict(counters["train"])
        self.ema.load_state_dict(counters["ema"])
        self.evaluation.load_state_dict(counters.get("evaluation", {}))
        results = self.run_dir / "results.json"
        if st.step >= self.total_steps and results.is_file():
            raise RunFinished(f"run {self.run_dir} finished at step {st.step} ({results}); "
                              "nothing to do")
        # Records after the checkpoint are written again; so is the final evaluation.
        self.log.keep_until(st.step, drop_eval_at_step=st.step >= self.total_steps)
        return bool(counters.get("eval_pending", False))
