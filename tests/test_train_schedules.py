"""Learning-rate and KL-weight schedules against hand-computed values."""

import pytest
import torch

from bayeslora.schedules import KLWeighting, lr_scheduler


def learning_rates(schedule: str, steps: int, **options) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, schedule, total_steps=steps, **options)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_constant_with_and_without_warmup():
    assert learning_rates("constant", 5, steps_per_epoch=5) == [1.0] * 5
    assert learning_rates("constant", 5, steps_per_epoch=5, warmup_steps=2) == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_linear_warmup_then_decay_to_zero():
    # warm-up over 2 steps, then (total - step) / (total - warmup) with total 6
    assert learning_rates("linear", 6, steps_per_epoch=6, warmup_steps=2) == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25])


def test_multistep_divides_by_ten_after_each_milestone_epoch():
    rates = learning_rates("multistep", 15, steps_per_epoch=3, milestones=(2, 4))
    assert rates == pytest.approx([1] * 6 + [0.1] * 6 + [0.01] * 3)


def test_beta_weighting_with_warmup_in_steps_and_epochs():
    steps = KLWeighting("beta", beta=0.5, warmup=4, warmup_unit="steps", n_train=100, steps_per_epoch=10)
    assert [steps.weight(s) for s in range(6)] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert steps.divisor == 100
    epochs = KLWeighting("beta", beta=1.0, warmup=2, warmup_unit="epochs", n_train=100, steps_per_epoch=10)
    assert [epochs.weight(s) for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([0.5, 0.5, 1, 1, 1, 1])
    plain = KLWeighting("beta", beta=2.0, warmup=0, warmup_unit="steps", n_train=100, steps_per_epoch=10)
    assert plain.weight(0) == 2.0


def test_released_weighting_is_a_tenth_per_batch_from_epoch_index_two():
    """train_script.py of the released code: `if ep >= 2:` (0-based) adds 0.1 * KL / len(train_loader)."""
    released = KLWeighting("released", beta=1.0, warmup=0, warmup_unit="steps", n_train=96, steps_per_epoch=12)
    assert released.divisor == 12
    assert [released.weight(s) for s in (0, 11, 12, 23, 24, 40)] == [0.0, 0.0, 0.0, 0.0, 0.1, 0.1]
