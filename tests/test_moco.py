"""MoCo: the queue in samples, lightly's loss, the method's wiring through the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from lightly.loss import NTXentLoss

from ssl_ema.config import ConfigError, dump_yaml, from_dict, load_config
from ssl_ema.engine.loaders import build_run_data
from ssl_ema.methods import build_method
from ssl_ema.methods.moco import KeyQueue, MoCo, MoCoConfig, _gather

SMALL = ["method.name=moco", "data.image_size=8", "model.backbone=test_resnet",
         "model.cifar_stem=false", "moco.hidden_dim=16", "moco.output_dim=8",
         "moco.queue_size=12", "train.batch_size=4"]


def test_queue_holds_the_last_samples_whatever_the_batch() -> None:
    keys = torch.nn.functional.normalize(torch.randn(30, 4), dim=1)
    by_4, by_6 = KeyQueue(10, 4), KeyQueue(10, 4)
    for i in range(0, 16, 4):  # 16 keys in batches of 4 ...
        by_4.push(keys[i:i + 4])
    for i in range(16, 28, 6):  # ... then 12 in batches of 6: a batch-size change mid-run
        by_4.push(keys[i:i + 6])
    for i in range(0, 28, 7):  # the same 28 keys in batches of 7
        by_6.push(keys[i:i + 7])
    newest_first = keys[:28].flip(0)[:10]
    assert torch.allclose(by_4.newest_first(), newest_first)
    assert torch.allclose(by_6.newest_first(), newest_first)
    assert int(by_4.pushed) == int(by_6.pushed) == 28
    assert tuple(by_4.keys.shape) == (10, 4)  # length in samples, not batches
    big = KeyQueue(5, 4)
    big.push(keys[:8])  # more keys than room: the newest 5 stay
    assert torch.allclose(big.newest_first(), keys[:8].flip(0)[:5])


def test_loss_is_lightlys_ntxent_with_memory_bank() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    queue = KeyQueue(20, 8)
    queue.push(torch.randn(20, 8))
    ours = NTXentLoss(temperature=0.2, memory_bank_size=(20, 8))
    ours.memory_bank = queue
    reference = NTXentLoss(temperature=0.2, memory_bank_size=(20, 8))
    reference.memory_bank.bank = queue.keys.clone()  # lightly's bank: (size, dim)
    assert ours(q, k).item() == pytest.approx(reference(q.clone(), k.clone()).item(), abs=1e-6)
    # and by hand: InfoNCE with the positive first (He et al. 2020, Eq. 1)
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.keys.T], dim=1) / 0.2
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert ours(q, k).item() == pytest.approx(expected.item(), abs=1e-5)
    assert torch.equal(queue.keys, reference.memory_bank.bank)  # the loss never pushes


def test_step_pushes_the_teacher_keys_of_the_second_view() -> None:
    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    method = build_method(cfg, in_chans=1)
    assert isinstance(method, MoCo) and cfg.section(MoCoConfig).queue_size == 12
    views = torch.randn(2, 4, 1, 8, 8)
    before = method.queue.keys.clone()
    out = method((views[0], views[1], torch.zeros(4, dtype=torch.long)))
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    with torch.no_grad():
        k1 = method._teacher(views[1])
    assert torch.allclose(method.queue.newest_first()[:4],
                          torch.nn.functional.normalize(k1, dim=1).flip(0), atol=1e-5)
    assert torch.equal(method.queue.newest_first()[4:], before.flip(0)[:8])
    method.eval()
    method((views[0], views[1], torch.zeros(4, dtype=torch.long)))  # evaluation: no push
    assert int(method.queue.pushed) == 4
    # The queue is state: it is in the state dict, so checkpoints and resume carry it.
    assert "criterion.memory_bank.keys" in method.state_dict()


def test_recipe_section_views_and_checks() -> None:
    cfg = load_config(None, [*SMALL, "moco.temperature=0.2"])
    assert cfg.section(MoCoConfig).temperature == 0.2
    assert len(build_run_data(load_config(None, SMALL)).train[0]) == 3  # two views + label
    with pytest.raises(ConfigError, match="moco.queue_size: 12 keys is fewer than one batch"):
        load_config(None, [*SMALL, "train.batch_schedule=[[1, 16]]", "train.epochs=2"])
    with pytest.raises(ConfigError, match="moco.temperature: must be positive"):
        load_config(None, [*SMALL, "moco.temperature=0"])
    with pytest.raises(ConfigError, match="unknown key 'moco.size'"):
        load_config(None, [*SMALL, "moco.size=3"])
    # A run's config.yaml (resume, tools/eval.py) reads back to the same config.
    dumped = yaml.safe_load(dump_yaml(cfg))
    assert "sections" not in dumped and dumped["moco"]["temperature"] == 0.2
    assert from_dict(dumped) == cfg


def _push_on_rank(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=2)
    queue = KeyQueue(6, 2)
    queue.keys.zero_()
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * (rank + 1)  # rank 0: 2 keys, rank 1: 2 keys
    queue.push(_gather(keys))
    torch.save(queue.newest_first(), f"{folder}/queue_{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_pushes_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_push_on_rank, args=(str(tmp_path),), nprocs=2)
    q0, q1 = (torch.load(tmp_path / f"queue_{r}.pt") for r in range(2))
    assert torch.equal(q0, q1)  # the same queue on every rank ...
    # ... holding the global batch in rank order, normalised: newest first is rank 1's last key.
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert torch.equal(q0[:4], expected) and int(q0[4:].abs().sum()) == 0
