"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, Sec. 3.4).

The vote of each of the k nearest training features (cosine similarity s) is weighted by
exp(s / t): lightly's `knn_predict`, the protocol behind its published benchmarks (k=200,
t=0.1), scored in chunks so the similarity matrix fits in memory.

The bank can stay sharded over processes (``sharded=True``): each process scores every query
against its own shard and keeps its k best candidates (similarity, label); the candidates of
all processes are gathered and the k best of them voted on, which is the vote of the whole
bank, since the global k nearest are among the union of each shard's k nearest (up to the
rounding of a similarity, which can differ by an ulp between a product with the shard and one
with the whole bank, docs/SCALE_OUT.md). Memory per
process: the shard plus one chunk's similarities to it (docs/SCALE_OUT.md, "kNN"). Only this
path votes with our own `weighted_vote`, since `knn_predict` takes the whole bank, not
candidates; tests/test_knn_sharded.py checks it predicts as `knn_predict` on the whole bank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightly.utils.benchmarking import knn_predict

from ssl_ema.precision import exact_fp32

Candidates = tuple[torch.Tensor, torch.Tensor]  # similarities (b, k), most similar first; labels


def nearest(queries: torch.Tensor, bank_t: torch.Tensor, bank_labels: torch.Tensor,
            k: int) -> Candidates:
    """The ``k`` most similar bank items of each query: ``queries (b, D)``, ``bank_t (D, N)``."""
    sims, index = (queries @ bank_t).topk(k, dim=1)  # (b, k)
    return sims, bank_labels[index]


def weighted_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  temperature: float) -> torch.Tensor:
    """The class with the largest sum of exp(s / t) over each query's neighbours: ``(b,)``."""
    weights = (sims / temperature).exp()  # (b, k); a padded candidate (-inf) weighs 0
    scores = torch.zeros(len(sims), num_classes, device=sims.device, dtype=weights.dtype)
    return scores.scatter_add_(1, labels, weights).argmax(1)


def _gather_candidates(sims: torch.Tensor, labels: torch.Tensor, k: int) -> Candidates:
    """The ``k`` best of every process's candidates ``(b, k)``: the same on every process."""
    world = dist.get_world_size()
    every_s, every_l = [torch.empty_like(sims) for _ in range(world)], \
        [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(every_s, sims.contiguous())  # NCCL and gloo alike
    dist.all_gather(every_l, labels.contiguous())
    top, index = torch.cat(every_s, 1).topk(k, dim=1)  # (b, W * k) -> (b, k)
    return top, torch.cat(every_l, 1).gather(1, index)


def _local_candidates(queries: torch.Tensor, bank_t: torch.Tensor, bank_labels: torch.Tensor,
                      k: int) -> Candidates:
    """This shard's ``min(k, N_shard)`` nearest, padded to ``k`` with similarity -inf."""
    b, own = len(queries), min(k, bank_t.shape[1])
    sims = torch.full((b, k), float("-inf"), device=queries.device)
    labels = torch.zeros(b, k, dtype=torch.long, device=queries.device)
    if own:
        sims[:, :own], labels[:, :own] = nearest(queries, bank_t, bank_labels, own)
    return sims, labels


@torch.no_grad()
@exact_fp32()  # similarities in fp32, not TF32: the neighbours are the data's, not the device's
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
    sharded: bool = False,
) -> torch.Tensor:
    """Predicted labels ``(M,)`` for L2-normalised ``test_features (M, D)``.

    ``train_features (N, D)`` must be L2-normalised too; k is capped at N. ``sharded``: they are
    this process's shard of the bank (``torch.distributed`` initialised; every process passes the
    same queries and gets the predictions of the whole bank; a shard may be empty).
    """
    sharded = sharded and dist.is_initialized() and dist.get_world_size() > 1
    bank = train_features.t().contiguous()  # (D, N)
    total = torch.tensor(train_features.shape[0], device=test_features.device)
    if sharded:
        dist.all_reduce(total)
    k = min(k, int(total))
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        queries = test_features[start:start + chunk]
        if sharded:
            sims, labels = _gather_candidates(
                *_local_candidates(queries, bank, train_labels, k), k)
            preds.append(weighted_vote(sims, labels, num_classes, temperature))
        else:
            ranked = knn_predict(queries, bank, train_labels, num_classes, knn_k=k,
                                 knn_t=temperature)  # (b, C), best first
            preds.append(ranked[:, 0])
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    sharded: bool = False,
) -> float:
    """Top-1 accuracy of weighted kNN on the test set (``sharded``: see `knn_classify`)."""
    pred = knn_classify(train_features, train_labels, test_features, num_classes, k,
                        temperature, sharded=sharded)
    return (pred == test_labels).float().mean().item()
