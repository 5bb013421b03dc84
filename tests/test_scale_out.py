"""Beyond one machine (docs/SCALE_OUT.md): engines that shard the student are refused; two
"nodes" of one process each train the same run as two processes on one node."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_ema.engine.launch import train
from tests.helpers import ROOT, TINY, one_line_error, python


@pytest.mark.parametrize(("env", "named"), [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),  # what `accelerate launch --use_fsdp` sets
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ({"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_TP_SIZE": "2"},
     "tensor parallelism (tp_size)"),
])
def test_an_engine_that_shards_the_student_is_refused(
    env: dict[str, str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    assert train(str(recipe), [f"run.output_dir={tmp_path / 'runs'}"]) == 2
    line = one_line_error(capsys)
    assert f"configured for {named}, which shards the student" in line
    assert "use DDP (accelerate launch --multi_gpu" in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_ddp_and_a_parallelism_config_without_sharding_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ssl_ema.engine.run import check_engine

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "8")  # DDP: replicas only
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "1")
    check_engine()


def test_a_trainer_built_in_a_script_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_ema.config import ConfigError, load_config
    from ssl_ema.engine.accelerator import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="configured for FSDP"):
        build_accelerator(load_config(None, TINY))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, launcher: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    recipe = out.parent / "r.yaml"
    recipe.write_text("method:\n  name: byol\n")
    cmd = [python(), "-m", "accelerate.commands.launch", "--quiet", "--multi_gpu",
           "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
           *launcher, str(ROOT / "tools" / "train.py"), str(recipe), *TINY,
           f"run.output_dir={out}"]
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run_dir(out: Path) -> Path:
    (run,) = (out / "r").iterdir()
    return run


@pytest.mark.slow  # three launchers, four trainers
def test_two_nodes_of_one_process_train_as_one_node_of_two(
    tmp_path: Path, tools_env: dict[str, str],
) -> None:
    # One thread each: a node's only process would otherwise take every core (engine/
    # accelerator.py divides them by LOCAL_WORLD_SIZE), and another thread count can change
    # the float results of CPU kernels.
    env = {**tools_env, "SSL_EMA_CPU_THREADS": "1"}
    port = str(_free_port())
    nodes = [_launch(tmp_path / "two", ["--num_machines", "2", "--machine_rank", str(rank),
                                        "--main_process_ip", "127.0.0.1",
                                        "--main_process_port", port], env) for rank in (0, 1)]
    one = _launch(tmp_path / "one", ["--num_machines", "1",
                                     "--main_process_port", str(_free_port())], env)
    for proc in (*nodes, one):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    runs = {name: _run_dir(tmp_path / name) for name in ("one", "two")}
    for run in runs.values():
        assert json.loads((run / "header.json").read_text())["world_size"] == 2
    # Every tensor of the final checkpoint (student, teacher, heads, BatchNorm buffers) is the
    # same, bit for bit, and so are the losses of every step and the kNN scores.
    saved = {name: load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
             for name, run in runs.items()}
    assert saved["one"].keys() == saved["two"].keys()
    for name, value in saved["one"].items():
        assert torch.equal(value, saved["two"][name]), name

    def records(run: Path) -> list[dict[str, object]]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]

    assert [r["event"] for r in records(runs["one"])].count("train") == 3
    assert records(runs["one"]) == records(runs["two"])
    assert json.loads((runs["one"] / "results.json").read_text()) == \
        json.loads((runs["two"] / "results.json").read_text())

