"""Power-function EMAs of a student, driven by samples seen (EDM2, App. C.2, in samples).

EDM2 updates a power EMA after optimizer step t with beta = (1 - 1/t)^(gamma + 1). Written in
samples seen, with n samples seen after the step and B = n - n_prev samples in it, the momentum
of one update is

    beta = (1 - B / n)^(gamma + 1) = (n_prev / n)^(gamma + 1).

The product of the later momenta telescopes, so the student of the step ending at n_k enters
the average seen at N with weight (n_k^(g+1) - n_{k-1}^(g+1)) / N^(g+1): exactly the integral
of the profile p(n; N, g) over (n_{k-1}, n_k], whatever the batch of each step. A run at batch
kappa B and one at batch B therefore average with the same profile in samples seen (the EMA
Scaling Rule for a growing EMA), and a batch schedule that changes B mid-run needs nothing
else: only n_prev and n enter. The first update (n_prev = 0) has beta = 0 and copies the student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ssl_ema.posthoc.profiles import sigma_rel_to_gamma

SAMPLES_SEEN = "samples_seen"
SIGMA_RELS = "sigma_rels"


class PowerEMA:
    """Power EMAs of ``student`` (name -> live floating tensor), one per ``sigma_rels`` entry.

    The averages are fp32 accumulators on the student's device, updated with one
    ``torch._foreach_lerp_`` per EMA (as `ssl_ema.ema.EMA` does); a bf16/fp16 student is upcast
    on the fly. Call :meth:`update` after each optimizer step with the samples seen after it.
    """

    def __init__(self, student: Mapping[str, torch.Tensor], sigma_rels: Sequence[float]):
        if not sigma_rels:
            raise ValueError("PowerEMA needs at least one sigma_rel")
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"sigma_rels must differ from one another, got {list(sigma_rels)}")
        bad = [name for name, t in student.items() if not t.is_floating_point()]
        if bad:
            raise ValueError(f"PowerEMA averages floating tensors only; {bad[0]} is "
                             f"{student[bad[0]].dtype}: leave it out of the student mapping")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = tuple(student)
        self._student = [student[name] for name in self.names]
        self._averages = [[t.detach().to(torch.float32, copy=True) for t in self._student]
                          for _ in self.sigma_rels]
        self._upcast = any(t.dtype != torch.float32 for t in self._student)  # decided once
        self.samples_seen = 0

    def momenta(self, samples_seen: int) -> list[float]:
        """beta = (n_prev / n)^(gamma + 1) of each EMA for an update at ``samples_seen``."""
        if samples_seen <= self.samples_seen:
            raise ValueError(f"samples seen must grow from one update to the next: got "
                             f"{samples_seen} after {self.samples_seen}")
        if self.samples_seen == 0:
            return [0.0] * len(self.gammas)
        ratio = self.samples_seen / samples_seen
        return [ratio ** (gamma + 1.0) for gamma in self.gammas]

    @torch.no_grad()
    def update(self, samples_seen: int) -> None:
        """Average the student in: it stands for the samples since the previous update."""
        momenta = self.momenta(samples_seen)
        student = self._student
        if self._upcast:  # a bf16/fp16 student averaged in fp32
            student = [s.to(torch.float32) for s in student]
        for average, momentum in zip(self._averages, momenta):
            # lerp_(s, w) = average + w (s - average); w = 1 returns s exactly (first update).
            torch._foreach_lerp_(average, student, 1.0 - momentum)
        self.samples_seen = int(samples_seen)

    def average(self, index: int) -> dict[str, torch.Tensor]:
        """The averaged tensors of EMA ``index`` (views of the accumulators: copy to keep)."""
        return dict(zip(self.names, self._averages[index]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so safetensors holds it and no unpickler is needed to resume."""
        state = {SAMPLES_SEEN: torch.tensor(self.samples_seen, dtype=torch.int64),
                 SIGMA_RELS: torch.tensor(self.sigma_rels, dtype=torch.float64)}
        for i, average in enumerate(self._averages):
            state.update({f"{i}/{name}": t for name, t in zip(self.names, average)})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`; the sigma_rels and tensor names must match."""
        saved = tuple(state[SIGMA_RELS].tolist()) if SIGMA_RELS in state else None
        if saved != self.sigma_rels:
            raise ValueError(f"the saved power EMAs have sigma_rels {saved}, this run "
                             f"{self.sigma_rels}: resume with the same ema.posthoc.sigma_rels")
        want = {f"{i}/{n}" for i in range(len(self.sigma_rels)) for n in self.names}
        have = set(state) - {SAMPLES_SEEN, SIGMA_RELS}
        if have != want:
            odd = sorted(have ^ want)
            raise ValueError(f"the saved power EMAs hold other tensors than the student "
                             f"({len(odd)} differ, e.g. {odd[0]}): not this model's state")
        for i, average in enumerate(self._averages):
            for name, t in zip(self.names, average):
                saved_t = state[f"{i}/{name}"]
                if saved_t.shape != t.shape:
                    raise ValueError(f"the saved power EMA's {name} has shape "
                                     f"{tuple(saved_t.shape)}, the student's {tuple(t.shape)}")
                t.copy_(saved_t)
        self.samples_seen = int(state[SAMPLES_SEEN].item())
