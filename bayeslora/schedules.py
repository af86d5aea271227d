"""Learning-rate and KL-weight schedules of the training loop.

Both are pure functions of the optimizer step (and the epoch length), so a
resumed run recomputes them exactly.

Learning rate (`lr_scheduler`), as a multiplier of the base rate:
- `constant`: 1 after an optional linear warm-up;
- `linear`: linear warm-up over `warmup_steps`, then linear decay to 0 at the last step;
- `multistep`: x0.1 after each epoch listed in `milestones` (1-based; the released
  code's "LR x 0.1 after epochs 2 and 4" is milestones [2, 4]).

KL weight (`KLWeighting`): the loop adds `weight(step) * method.regulariser(model, divisor)`
to the mean NLL, where a Bayesian method's regulariser is `KL / divisor`:
- `beta` (default): `beta * ramp * KL / N_train`, `ramp` rising linearly from 1/W to 1
  over the first W steps (or epochs) and 1 afterwards; W = 0 means no warm-up. This is
  the ELBO per training example (beta = 1).
- `released`: `0.1 * KL / batches_per_epoch`, switched on from 0-based epoch index 2, i.e.
  the third epoch, after the first LR cut (the released code's `if ep >= 2`; it weighs the KL by 0.1 * N_train / batches_per_epoch = 0.1 * batch
  size times the ELBO's weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

LR_SCHEDULES = ("constant", "linear", "multistep")
KL_WEIGHTINGS = ("beta", "released")


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    milestones: tuple[int, ...] = (),
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate scheduler, stepped once per optimizer step."""
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "multistep":
        steps = [epoch * steps_per_epoch for epoch in milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=0.1)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


@dataclass(frozen=True)
class KLWeighting:
    """Weight and divisor of the regulariser at a given optimizer step (0-based)."""

    kind: str  # one of KL_WEIGHTINGS
    beta: float
    warmup: int  # length of the linear ramp, in `warmup_unit`s; 0 = none
    warmup_unit: str  # "steps" or "epochs"
    n_train: int
    steps_per_epoch: int

    def weight(self, step: int) -> float:
        """The factor multiplying `regulariser(model, self.divisor)` at this step."""
        epoch = step // self.steps_per_epoch  # 0-based
        if self.kind == "released":
            return 0.1 if epoch >= 2 else 0.0
        if self.warmup == 0:
            return self.beta
        progress = step if self.warmup_unit == "steps" else epoch
        return self.beta * min(1.0, (progress + 1) / self.warmup)

    @property
    def divisor(self) -> int:
        return self.steps_per_epoch if self.kind == "released" else self.n_train
