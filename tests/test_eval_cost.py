"""What keeps evaluation cheap: models with the same weights scored once, every model scored in
one pass over the data, a fixed training subset, and a word when loader workers outnumber the
cores."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ssl_ema.config import load_config
from ssl_ema.ema import recompute_batchnorm
from ssl_ema.engine.loaders import build_run_data, worker_warning
from ssl_ema.eval.classify import logits_of_all
from ssl_ema.eval.distinct import representatives, same_weights


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def test_same_weights_groups_equal_models_only() -> None:
    a, b, c = net(0), net(0), net(1)
    assert same_weights(a, b) and not same_weights(a, c)
    assert representatives({"teacher": a, "student": c, "ema_1": b}) == \
        {"teacher": "teacher", "student": "student", "ema_1": "teacher"}
    with torch.no_grad():
        b[1].running_mean += 1e-7  # a buffer alone makes a different model
    assert representatives({"t": a, "e": b}) == {"t": "t", "e": "e"}


def test_one_pass_scores_every_model_with_each_buffer_set() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))) for _ in range(3)]
    nets = {"a": net(0), "b": net(1)}
    sets = {}
    for name, m in nets.items():
        own = [t.clone() for t in m.buffers()]
        recompute_batchnorm(m, [(x,) for x, _ in batches], None)
        sets[(name, False)], sets[(name, True)] = own, [t.clone() for t in m.buffers()]
        torch._foreach_copy_(list(m.buffers()), own)
    got = logits_of_all(nets, sets, batches)
    assert all(m.training for m in nets.values())  # modes restored
    for (name, bn), values in sets.items():
        m = nets[name]
        torch._foreach_copy_(list(m.buffers()), values)
        m.eval()
        want = torch.cat([m(x) for x, _ in batches])
        assert torch.equal(got[(name, bn)][0], want)
        assert torch.equal(got[(name, bn)][1], torch.cat([y for _, y in batches]))
    assert not torch.equal(got[("a", False)][0], got[("a", True)][0])


def test_train_per_class_keeps_the_first_images_of_each_class() -> None:
    def images(bundle):  # SeededViews(Subset(Relabelled(TensorImages), train split), views)
        return bundle.train.source.dataset.source

    full = images(build_run_data(load_config("recipes/supervised_ema_digits.yaml", [])))
    sub = build_run_data(load_config("recipes/supervised_ema_digits.yaml",
                                 ["data.train_per_class=30"]))
    assert np.bincount(images(sub).labels.numpy()).tolist() == [30] * 10
    # the first 30 of each class of the full training set, whatever the seed
    y = full.labels.numpy()
    first = np.sort(np.concatenate([np.flatnonzero(y == c)[:30] for c in range(10)]))
    assert torch.equal(images(sub).images, full.images[first])
    again = build_run_data(load_config("recipes/supervised_ema_digits.yaml",
                                   ["data.train_per_class=30", "run.seed=5"]))
    assert torch.equal(images(again).images, full.images[first])
    # the validation split (labels.val_fraction 0.2) comes out of the subset
    assert len(sub.val_eval) == 60 and len(sub.train_eval) == 240


def test_workers_beyond_the_cores_are_named() -> None:
    assert worker_warning(0, 1) == ""
    line = worker_warning(10_000, 1)
    assert line.startswith("warning: data.num_workers=10000 x 1 processes exceeds the")
