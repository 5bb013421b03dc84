"""The one training loop, for every method, on Hugging Face Accelerate.

Per optimizer step: (micro-batches with gradient accumulation) -> optimizer step -> once:
teacher momentum from the schedule (a function of samples seen) -> EMA update of the teacher on
the unwrapped module -> metrics. kNN evaluation of teacher and student every few epochs, and a
checkpoint every N steps and at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssl_ema.config import Config, ConfigError, dump_yaml
from ssl_ema.data import DataBundle, build_data
from ssl_ema.ema import EMA
from ssl_ema.engine.checkpoint import save_checkpoint
from ssl_ema.engine.optim import build_optimizer
from ssl_ema.engine.tracking import MetricsLog, device_name, git_sha, versions
from ssl_ema.eval.features import extract_features
from ssl_ema.eval.knn import knn_accuracy
from ssl_ema.methods import TeacherStudentMethod, build_method
from ssl_ema.scaling import kappa, scale_lr
from ssl_ema.schedules import warmup_cosine


@dataclass
class TrainState:
    """Counters that, with the seed, determine every schedule; saved in each checkpoint."""

    step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    knn_random: float = -1.0  # kNN accuracy of the randomly initialised backbone

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def per_device_batch(cfg: Config, world_size: int) -> int:
    """Split the effective batch over processes and accumulation; error if it does not divide."""
    div = world_size * cfg.train.grad_accumulation
    if cfg.train.batch_size % div:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by world size {world_size} "
            f"x train.grad_accumulation {cfg.train.grad_accumulation}; pick a multiple of {div}"
        )
    return cfg.train.batch_size // div


class Trainer:
    """Builds everything from a :class:`Config` and runs `fit`; see the module docstring."""

    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None):
        self.cfg, self.run_dir, self.resume_from = cfg, run_dir, resume_from
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accumulation,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(cfg.run.seed)
        if self.accelerator.device.type == "cpu":
            # `accelerate launch` sets OMP_NUM_THREADS=1; share this machine's cores instead.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        self.batch = per_device_batch(cfg, self.accelerator.num_processes)
        self.data: DataBundle = build_data(cfg)  # data errors surface before any model is built
        method = build_method(cfg, self.data.in_chans)
        self.lr = scale_lr(cfg.optim.lr, cfg.optim.name,
                           kappa(cfg.train.batch_size, cfg.optim.reference_batch))
        optimizer = build_optimizer(method.student, cfg.optim, self.lr.value)
        loaders = self._loaders()
        self.method, self.optimizer, self.train_loader, self.bank_loader, self.query_loader = (
            self.accelerator.prepare(method, optimizer, *loaders)
        )
        unwrapped: TeacherStudentMethod = self.accelerator.unwrap_model(self.method)
        self.ema = EMA(unwrapped.teacher, unwrapped.student_for_ema())
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state, self.ema)
        self.log = MetricsLog(run_dir / "metrics.jsonl", self.accelerator.is_main_process)

    # ----------------------------------------------------------------------------- set-up
    def _loaders(self) -> tuple[DataLoader, DataLoader, DataLoader]:
        workers = self.cfg.data.num_workers
        common: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0,
                                  "pin_memory": torch.cuda.is_available()}
        train = DataLoader(self.data.train, batch_size=self.batch, shuffle=True, drop_last=True,
                           **common)
        if len(train) == 0:
            raise ConfigError(
                f"train.batch_size {self.cfg.train.batch_size} exceeds the {len(self.data.train)} "  # type: ignore[arg-type]
                "training images; lower it"
            )
        bank = DataLoader(self.data.train_eval, batch_size=256, **common)
        query = DataLoader(self.data.test_eval, batch_size=256, **common)
        return train, bank, query

    @property
    def samples_per_epoch(self) -> int:
        return len(self.train_loader) * self.batch * self.accelerator.num_processes

    @property
    def total_samples(self) -> int:
        return self.cfg.train.epochs * self.samples_per_epoch

    @property
    def total_steps(self) -> int:
        per_epoch = math.ceil(len(self.train_loader) / self.cfg.train.grad_accumulation)
        steps = self.cfg.train.epochs * per_epoch
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    def header(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        n_params = sum(p.numel() for p in acc.unwrap_model(self.method).student.parameters())
        return {
            "git": git_sha(), "versions": versions(), "device": device_name(acc.device),
            "world_size": acc.num_processes, "per_device_batch": self.batch,
            "grad_accumulation": cfg.train.grad_accumulation,
            "effective_batch": cfg.train.batch_size, "mixed_precision": cfg.train.mixed_precision,
            "reference_batch": cfg.optim.reference_batch, "kappa": self.lr.kappa,
            "lr": {"base": self.lr.base, "effective": self.lr.value, "rule": cfg.optim.name},
            "student_parameters": n_params, "train_images": len(self.data.train),  # type: ignore[arg-type]
            "steps": self.total_steps, "samples": self.total_samples,
        }

    def _write_header(self) -> None:
        h = self.header()
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            (self.run_dir / "header.json").write_text(json.dumps(h, indent=2) + "\n")
            print(
                f"ssl_ema {h['git']} | torch {h['versions']['torch']} | {h['device']}\n"
                f"batch: {h['world_size']} processes x {h['per_device_batch']} per device x "
                f"{h['grad_accumulation']} accumulation = {h['effective_batch']} effective "
                f"(reference {h['reference_batch']}, kappa {h['kappa']:g})\n"
                f"{self.lr.describe()} ({self.cfg.optim.name})\n"
                f"{h['steps']} optimizer steps, {h['samples']} samples | run dir: {self.run_dir}"
            )
        self.log.write({"event": "header", **h})

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Weighted kNN top-1 of the teacher's and the student's backbone on held-out data."""
        model: TeacherStudentMethod = self.accelerator.unwrap_model(self.method)
        e, out = self.cfg.eval, {}
        with self.accelerator.autocast():
            for role, backbone in (("teacher", model.teacher_backbone),
                                   ("student", model.student_backbone)):
                bank, bank_y = extract_features(backbone, self.bank_loader, self.accelerator)
                query, query_y = extract_features(backbone, self.query_loader, self.accelerator)
                out[f"knn_{role}"] = knn_accuracy(bank, bank_y, query, query_y,
                                                  self.data.num_classes, e.knn_k, e.knn_temperature)
        return out

    def _eval_due(self, epoch_done: int) -> bool:
        every = self.cfg.eval.every_epochs
        return every > 0 and epoch_done % every == 0

    # ----------------------------------------------------------------------------- training
    def _optimizer_step(self, micro_batches: int) -> dict[str, float]:
        """After gradients are synchronised: lr from the schedule, step, then the EMA update."""
        cfg, st = self.cfg, self.state
        progress = st.samples_seen / self.total_samples
        warmup = cfg.optim.warmup_epochs / cfg.train.epochs
        lr = warmup_cosine(self.lr.value, progress, warmup, self.lr.value * cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Once per optimizer step, on the unwrapped teacher (all ranks hold the same student).
        momentum = self.accelerator.unwrap_model(self.method).momentum(progress)
        self.ema.update(momentum)
        st.step += 1
        st.samples_seen += micro_batches * self.batch * self.accelerator.num_processes
        return {"lr": lr, "momentum": momentum}

    def _train_epoch(self, bar: tqdm) -> bool:
        """One pass over the data (resuming mid-epoch if needed); True if the epoch completed."""
        acc, st = self.accelerator, self.state
        self.train_loader.set_epoch(st.epoch)
        loader = acc.skip_first_batches(self.train_loader, st.batch_in_epoch) \
            if st.batch_in_epoch else self.train_loader
        micro, t0 = 0, time.perf_counter()
        for batch in loader:
            with acc.accumulate(self.method):
                out = self.method(batch)
                acc.backward(out["loss"])
                micro += 1
                st.batch_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                sched = self._optimizer_step(micro)
            if st.batch_in_epoch == len(self.train_loader):
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            self._after_step(out, sched, micro, time.perf_counter() - t0, bar)
            micro, t0 = 0, time.perf_counter()
            if st.step >= self.total_steps:
                break
        return st.batch_in_epoch == 0

    def _after_step(self, out: dict[str, torch.Tensor], sched: dict[str, float], micro: int,
                    seconds: float, bar: tqdm) -> None:
        cfg, st = self.cfg, self.state
        bar.update(1)
        if st.step % cfg.train.log_every == 0 or st.step == self.total_steps:
            metrics = {k: v.item() for k, v in out.items()}  # host sync only when logging
            images = micro * self.batch * self.accelerator.num_processes
            self.log.write({"event": "train", "step": st.step, "epoch": st.epoch,
                            "samples_seen": st.samples_seen, **metrics, **sched,
                            "images_per_s": images / max(seconds, 1e-9)})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{sched['lr']:.3g}",
                            momentum=f"{sched['momentum']:.4f}", refresh=False)
        every = cfg.train.checkpoint_every
        if every and st.step % every == 0 and st.step < self.total_steps:
            save_checkpoint(self.accelerator, self.run_dir, st.step, cfg.train.keep_checkpoints)

    def _log_eval(self) -> dict[str, float]:
        result = self.evaluate()
        st = self.state
        self.log.write({"event": "eval", "step": st.step, "epoch": st.epoch,
                        "samples_seen": st.samples_seen, **result})
        return result

    def fit(self) -> dict[str, float]:
        """Train to the end (or max_steps), evaluate, checkpoint; return the final metrics."""
        acc, st = self.accelerator, self.state
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
        self._write_header()
        if st.step == 0 and st.knn_random < 0:
            st.knn_random = self._log_eval()["knn_student"]  # student == teacher == random init
        self.method.train()
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not acc.is_main_process,
                   desc="train", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
        while st.epoch < self.cfg.train.epochs and st.step < self.total_steps:
            finished_epoch = self._train_epoch(bar)
            more = st.epoch < self.cfg.train.epochs and st.step < self.total_steps
            if finished_epoch and more and self._eval_due(st.epoch):
                self._log_eval()
        bar.close()
        result = self._log_eval()  # the final evaluation, always
        save_checkpoint(acc, self.run_dir, st.step, self.cfg.train.keep_checkpoints)
        final = {"knn_random": st.knn_random, **result, "step": st.step,
                 "samples_seen": st.samples_seen}
        if acc.is_main_process:
            (self.run_dir / "results.json").write_text(json.dumps(final, indent=2) + "\n")
        return final
