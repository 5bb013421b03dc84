"""The sharded kNN bank (`eval.knn`, `eval.features.extract_shard`) on 2 CPU processes (gloo
through Accelerate) against the whole bank in one process: the same predictions."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_ema.eval.features import extract_features, extract_shard
from ssl_ema.eval.knn import knn_accuracy, knn_classify

pytestmark = pytest.mark.slow  # starts two processes

WORLD = 2


def _data(n: int, m: int, classes: int = 5, dim: int = 8) -> tuple[torch.Tensor, ...]:
    """Overlapping noisy clusters (accuracy well below 1, so a wrong merge would show),
    continuous values (no tied similarities)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n + m,), generator=g)
    x = centres[y] + 1.5 * torch.randn(n + m, dim, generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def _check_bank(acc, backbone: nn.Module, n: int, m: int, batch: int) -> None:
    """One bank and query set: both sharding modes, several k, against one process."""
    bank_x, bank_y, query_x, query_y = _data(n, m)
    batches = [(bank_x[i:i + batch], bank_y[i:i + batch]) for i in range(0, n, batch)]
    whole, whole_y = extract_features(backbone, batches)  # one process, every item
    query, _ = extract_features(backbone, [(query_x, query_y)])
    prepared = acc.prepare(DataLoader(TensorDataset(bank_x, bank_y), batch_size=batch))
    for shard, shard_y in (extract_shard(backbone, prepared, acc, prepared=True),
                           extract_shard(backbone, batches, acc, prepared=False)):
        # Each item in exactly one shard: the shards' rows are the bank's rows.
        every = [torch.zeros(n, whole.shape[1]) for _ in range(WORLD)]
        sizes = [torch.zeros((), dtype=torch.long) for _ in range(WORLD)]
        torch.distributed.all_gather(sizes, torch.tensor(len(shard)))
        assert sum(int(s) for s in sizes) == n, sizes
        padded = torch.zeros(n, whole.shape[1])
        padded[:len(shard)] = shard if len(shard) else 0.0
        torch.distributed.all_gather(every, padded)
        rows = torch.cat([e[:int(s)] for e, s in zip(every, sizes)])
        # Equal up to rounding (a batch of another size can take another matmul kernel);
        # not torch.testing.assert_close, whose import of torch.distributed.tensor takes seconds.
        gap = rows[rows[:, 0].argsort()] - whole[whole[:, 0].argsort()]
        assert gap.abs().max() < 1e-6, gap.abs().max()
        for k in (1, 7, 200):  # 200 > either shard: padded candidates, k capped at n
            one = knn_classify(whole, whole_y, query, 5, k=k, temperature=0.1, chunk=16)
            two = knn_classify(shard, shard_y, query, 5, k=k, temperature=0.1, chunk=16,
                               sharded=True)
            assert torch.equal(one, two), (k, (one != two).sum())
        assert knn_accuracy(shard, shard_y, query, query_y, 5, k=7, sharded=True) == \
            knn_accuracy(whole, whole_y, query, query_y, 5, k=7)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == WORLD
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
    # 203 items in batches of 16: the prepared loader pads the last round with items from
    # the start, which must not enter the bank twice.
    _check_bank(acc, backbone, n=203, m=61, batch=16)
    _check_bank(acc, backbone, n=1, m=9, batch=4)  # one item: one shard is empty
    acc.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_sharded_bank_predicts_as_the_whole_bank() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)

