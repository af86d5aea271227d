"""A loud warning when Bayesian-LoRA factors are trained without their KL term.

Trained on the task loss alone (a plain transformers `Trainer`, TRL's `SFTTrainer`, a
hand-written loop that forgot the KL), a Bayesian-LoRA adapter quietly stops being
variational inference: nothing keeps the posterior near the prior, and the fitted
uncertainty means nothing. Every Bayesian layer watches the gradient of its factors;
when a backward pass reaches a factor for which `bayeslora.kl_divergence` was never
computed, a `MissingKLWarning` is issued (Python's warning filters show it once per
place in the code unless told otherwise).

Computing the KL once is enough to silence it, so gradient accumulation that adds the
KL to one micro-batch only does not warn.
"""

from __future__ import annotations

import warnings

from bayeslora.inducing import InducingFactor

MISSING_KL_MESSAGE = (
    "bayeslora: gradients reached Bayesian-LoRA factors through a loss without their KL term "
    "(bayeslora.kl_divergence was never computed): this trains a noisy maximum-likelihood LoRA, not the posterior. "
    "A plain transformers Trainer or trl SFTTrainer does this; use bayeslora.integrations.trainer.BayesLoraTrainer "
    "(or BayesLoraSFTTrainer), or add beta * bayeslora.kl_divergence(model) / N_train to your loss."
)


class MissingKLWarning(UserWarning):
    """A Bayesian-LoRA model is being trained without the KL term of its ELBO."""


def watch_for_missing_kl(factor: InducingFactor) -> None:
    """Warn when a backward pass reaches `factor` before any KL of it was computed."""
    factor.kl_computed = False

    def check(gradient):
        if not factor.kl_computed:
            warnings.warn(MISSING_KL_MESSAGE, MissingKLWarning)

    factor.u_mean.register_hook(check)


def note_kl_computed(factors) -> None:
    """Record that the KL of `factors` entered a loss (called by `bayeslora.kl_divergence`)."""
    for factor in factors:
        factor.kl_computed = True
