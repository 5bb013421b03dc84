"""Where a run lives: a new timestamped directory, or an existing one being resumed.

New runs go to ``<run.output_dir>/<run.name>/<YYYYmmdd-HHMMSS>`` so that repeating a command
never overwrites earlier results (``-2``, ``-3``, ... for runs started in the same second: the
folder is created when the run takes its lock, `lock.make_new_dir`). Resuming re-reads the run's
resolved ``config.yaml`` and refuses a recipe that would change the training, or a different
number of processes (a resumed run must be the same run).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from accelerate.utils.constants import RNG_STATE_NAME

from ssl_ema.config import (
    MOVED_KEYS,
    Config,
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from ssl_ema.config_checks import refuse_given_keys
from ssl_ema.run_files import (
    given_objects,
    is_checkpoint_path,
    newest_intact,
    saved_config,
    verified,
)

# Keys that may differ on resume: they change bookkeeping, not the trajectory. train.nonfinite
# too: while losses are finite, "skip" trains exactly as "fail" does, and resuming with "skip"
# is the way past a non-finite step that stopped a run (engine/guard.py).
RESUMABLE_CHANGES = {"train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.checkpoint_every_minutes", "train.nonfinite",
                     "train.log_every", "data.num_workers", "eval.every_epochs", "run.log_with"}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: configs compared key by key."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_target(resume: str) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) from a run directory (its newest intact checkpoint, with a
    one-line warning for each damaged newer one) or one of its checkpoints."""
    path = Path(resume)
    if is_checkpoint_path(path):
        if not path.is_dir():
            raise ConfigError(f"--resume: checkpoint '{path}' does not exist")
        return path.parent.parent, verified(path, "--resume: ")
    return path, newest_intact(path, "--resume: ")


def refuse_given(run_dir: Path) -> None:
    """A run trained on a data set or backbone given from Python resumes from Python only: its
    config.yaml does not name them."""
    given = given_objects(run_dir)
    if given:
        raise ConfigError(f"--resume: run {run_dir} trained on objects given from Python "
                          f"({', '.join(given)}); resume it from Python with "
                          "ssl_ema.train(..., resume=run_dir) and the same objects")


def changed_keys(run_dir: Path, cfg: Config, allowed: set[str]) -> list[tuple[str, object, object]]:
    """``(key, saved, now)`` for every key outside ``allowed`` where ``cfg`` differs from the
    run's saved ``config.yaml`` (see `config_changes`)."""
    return config_changes(flatten(saved_config(run_dir)), cfg, allowed)


def config_changes(saved: dict[str, object], cfg: Config,
                   allowed: set[str]) -> list[tuple[str, object, object]]:
    """``(key, saved, now)`` for every key outside ``allowed`` where ``cfg`` differs from the
    flat ``saved`` config. A key that ``saved`` lacks was added to ssl_ema after that run was
    written; it counts as unchanged while ``cfg`` keeps its default, because a new switch
    defaults to the behaviour from before it. So runs resume, and stored results stay valid,
    across versions that only add options; a changed default still counts as a change (the
    saved config holds the old value)."""
    saved = {MOVED_KEYS.get(k, k): v for k, v in saved.items()}  # older runs' key names
    now = flatten(to_dict(cfg))
    defaults = _defaults()
    return [(k, saved.get(k), now[k]) for k in sorted(now)
            if k not in allowed and saved.get(k, defaults.get(k)) != now[k]]


@functools.cache
def _defaults() -> dict[str, object]:
    return flatten(to_dict(from_dict({})))


def check_same_run(run_dir: Path, cfg: Config) -> None:
    changed = changed_keys(run_dir, cfg, RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed[:4])
        raise ConfigError(f"--resume: the recipe differs from the run's config.yaml ({diffs}); "
                          "resume with the same recipe, or start a new run")


def check_same_processes(checkpoint: Path, cfg: Config) -> None:
    """Refuse a resume on another number of processes than the checkpoint's (Accelerate writes
    one ``random_states_<rank>.pkl`` per process). The effective batch is kept, but its split
    is not: BatchNorm statistics are per process, each process's random state and share of the
    data depend on the split, so the run would not continue as it began (resume is bitwise
    on one process, not across world sizes: docs/GUARANTEES.md)."""
    saved = len(list(checkpoint.glob(f"{RNG_STATE_NAME}_*.pkl")))
    now = PartialState(cpu=cpu_processes()).num_processes
    if saved and saved != now:
        acc, batch = cfg.train.grad_accumulation, cfg.train.batch_size

        def split(world: int) -> str:
            per = f"{batch / (world * acc):g}"
            return f"{world} x {per} per device x {acc} accumulation = {batch}"

        raise ConfigError(f"--resume: {checkpoint} was written by {saved} process(es) "
                          f"({split(saved)}), this start has {now} ({split(now)}); the split "
                          "changes BatchNorm statistics, random states and data shards: resume "
                          f"on {saved} process(es), or start a new run")


def cpu_processes() -> bool:
    """True for several processes on a machine without CUDA (torchrun / accelerate launch).

    Accelerate picks its multi-process CPU mode (gloo) only when asked with ``cpu=True``; without
    it every process would silently train alone. The first `PartialState` fixes the mode, so
    every state in the program is created with this flag.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_launch() -> None:
    """Refuse a multi-process request that started one process: `accelerate launch --cpu
    --num_processes 2` runs its simple launcher, one process, having set MASTER_ADDR for the
    processes it does not start (accelerate/utils/launch.py, prepare_simple_launcher_cmd_env)."""
    world = max(int(os.environ.get(k, "1")) for k in
                ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and world == 1:
        raise ConfigError(
            "accelerate launch asked for several processes but started one (its --cpu launcher "
            "runs one); on CPU use 'accelerate launch --multi_gpu --num_processes 2' (no --cpu) "
            "or 'torchrun --nproc_per_node 2'; for one process, unset MASTER_ADDR")


# What `accelerate launch` (or `accelerate config`) sets for the engines that shard the student
# (accelerate/utils/launch.py); the values of PARALLELISM_CONFIG_* above 1 shard it too.
SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
SHARDING_SIZES = {"PARALLELISM_CONFIG_DP_SHARD_SIZE": "FSDP (dp_shard_size)",
                  "PARALLELISM_CONFIG_TP_SIZE": "tensor parallelism (tp_size)",
                  "PARALLELISM_CONFIG_CP_SIZE": "context parallelism (cp_size)",
                  "PARALLELISM_CONFIG_SP_SIZE": "sequence parallelism (sp_size)"}


def check_engine() -> None:
    """Refuse an Accelerate engine that shards the student (FSDP, DeepSpeed, Megatron-LM, tensor
    or context parallelism): the EMA lerps each teacher tensor towards the student tensor of the
    same name (`ema.EMA`), which needs a full replica of the student on every rank, as DDP
    keeps. Sharded teachers are not built yet (docs/SCALE_OUT.md, "Which engine")."""
    engines = [name for var, name in SHARDING_ENGINES.items()
               if os.environ.get(var, "false").lower() in ("true", "1")]
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        engines += [name for var, name in SHARDING_SIZES.items()
                    if os.environ.get(var, "1").strip() not in ("", "0", "1")]
    if engines:
        raise ConfigError(
            f"Accelerate is configured for {', '.join(engines)}, which shards the student; the EMA "
            "teachers need a full replica of it on every rank: use DDP (accelerate launch "
            "--multi_gpu, or distributed_type MULTI_GPU in the accelerate config), which fits "
            "models up to about 1B parameters per 80 GB GPU (docs/SCALE_OUT.md)")


def new_run_dir(cfg: Config) -> Path:
    """Where a new run goes; created (or suffixed) when it takes its lock (`locked_start`)."""
    state = PartialState(cpu=cpu_processes())  # all processes must agree on one timestamp
    stamp = [time.strftime("%Y%m%d-%H%M%S") if state.is_main_process else None]
    broadcast_object_list(stamp)
    return Path(cfg.run.output_dir) / (cfg.run.name or "run") / str(stamp[0])


def prepare_run(recipe: str | None, overrides: Sequence[str],
                resume: str | None) -> tuple[Config, Path, Path | None]:
    """Resolve config, run directory and (when resuming) the checkpoint to load."""
    if resume is None:
        cfg = load_config(recipe, overrides)
        refuse_given_keys(cfg)
        return cfg, new_run_dir(cfg), None
    run_dir, checkpoint = resume_target(resume)
    refuse_given(run_dir)
    if recipe is None:
        merged = flatten(saved_config(run_dir))
        merged.update(flatten(parse_overrides(overrides)))
        tree: dict = {}
        for key, value in merged.items():
            node = tree
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        cfg = from_dict(tree)
    else:
        cfg = load_config(recipe, overrides)
    refuse_given_keys(cfg)
    check_same_run(run_dir, cfg)
    check_same_processes(checkpoint, cfg)
    return cfg, run_dir, checkpoint
