"""Bayesian-LoRA (this project): a thin Method over the adapter API of `bayeslora`.

Lin, Guan, Patane, Gregg, Botterweck, "Bayesian-LoRA: Probabilistic Low-Rank
Adaptation of Large Language Models", ICML 2026 (see docs/METHOD and
`bayeslora.adapter`). Sparse inducing-weight Gaussian posterior per LoRA
factor, trained by VI:
    loss = mean NLL + beta_t * KL / N_train,
where this method returns KL / N_train and the training loop applies its
beta schedule. AdamW's weight decay (0.01, the released settings use
0.01-0.03) applies to the plain LoRA factors only: on the variational
parameters it would change the objective away from the ELBO, so they get
`posterior_weight_decay` (0 unless asked). lambda and the q0 sds learn at
`scale_lr` x the loop's rate, the whitened inducing means at `mean_lr` x.
Each predictive sample is one seeded posterior draw held for every forward
inside it (`bayeslora.sampling(model, "sample", seed=seed + s, hold=True)`),
N = 4 by default (the paper's N). Options are passed to `BayesLoraConfig`
(inducing sizes, prior_sd, flow, which modules are Bayesian, ...), on top of
the library's defaults or, with `constants="paper"`, the published constants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, ContextManager

import torch
from torch import nn

import bayeslora
from bayeslora.errors import UsageError
from bayeslora.methods.base import PREDICTIVE_SAMPLES, Method, register_method
from bayeslora.methods.lora import LORA_KEYS
from bayeslora.methods.mcdropout import active_lora_dropout


#: option `constants`: the library's defaults, or the published ones (`BayesLoraConfig.paper`)
CONSTANTS = {"default": bayeslora.BayesLoraConfig, "paper": bayeslora.BayesLoraConfig.paper}


#: without `bayesian_modules`, those of these that are targets are Bayesian and the other targets keep plain
#: LoRA factors, as in the released code (q_proj and lm_head Bayesian, v_proj plain); every target Bayesian
#: is the ablation row `bayeslora_all_bayesian` (docs/method.md, "Defaults")
DEFAULT_BAYESIAN_TARGETS = ("q_proj", "lm_head")


@register_method
class BayesLora(Method):
    name: ClassVar[str] = "bayeslora"
    default_samples: ClassVar[int] = PREDICTIVE_SAMPLES
    weight_decay: ClassVar[float] = 0.01

    def __init__(self, constants: str = "default", posterior_weight_decay: float = 0.0, scale_lr: float = 10.0,
                 mean_lr: float = 1.0, dropout_at_evaluation: bool = False, **options: Any) -> None:
        if constants not in CONSTANTS:
            raise UsageError(f"bayeslora constants must be one of {', '.join(CONSTANTS)}, got {constants!r}")
        super().__init__(**options)
        self.constants, self.posterior_weight_decay, self.scale_lr = constants, posterior_weight_decay, scale_lr
        self.mean_lr = mean_lr
        self.dropout_at_evaluation = dropout_at_evaluation

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = {
            "plain": {"params": [], "weight_decay": self.weight_decay},
            "posterior": {"params": [], "weight_decay": self.posterior_weight_decay},
            "means": {"params": [], "weight_decay": self.posterior_weight_decay, "lr_scale": self.mean_lr},
            # lambda and the q0 sds: Adam moves a parameter by about lr per step, and these start far from
            # where the ELBO puts them; lr_scale multiplies the loop's learning rate for this group
            "scales": {"params": [], "weight_decay": self.posterior_weight_decay, "lr_scale": self.scale_lr},
        }
        group_of = {}
        for factor in bayeslora.adapter.bayesian_factors(model):
            group_of.update({id(p): "posterior" for p in factor.parameters()})
            group_of.update({id(factor.u_mean): "means", id(factor.u_sd_raw): "scales", id(factor.lambda_raw): "scales"})
            if factor.noise_scales:
                group_of.update({id(factor.noise_row_raw): "scales", id(factor.noise_col_raw): "scales"})
        for p in model.parameters():
            if p.requires_grad:
                groups[group_of.get(id(p), "plain")]["params"].append(p)
        return list(groups.values())

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        settings = {key: lora[key] for key in LORA_KEYS if key in lora}
        options = dict(self.options)
        targeted = [name for name in DEFAULT_BAYESIAN_TARGETS if name in settings.get("target_modules", ())]
        if "bayesian_modules" not in options and targeted:
            options["bayesian_modules"] = targeted
        return bayeslora.get_bayeslora_model(model, CONSTANTS[self.constants](**settings, **options))

    def regulariser(
        self, model: nn.Module, n_train: int, step_in_epoch: int = 0, batches_per_epoch: int = 1
    ) -> torch.Tensor:
        return bayeslora.kl_divergence(model) / n_train

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        for sample in range(self.sample_count(n_samples)):
            yield self._draw(model, seed + sample)

    @contextlib.contextmanager
    def _draw(self, model: nn.Module, seed: int) -> Iterator[None]:
        """One held posterior draw; with `dropout_at_evaluation`, LoRA dropout active too (the released code
        scores its draws in train mode, which mixes MC-dropout into the predictive: an ablation, not the method)."""
        dropout = active_lora_dropout(model, seed) if self.dropout_at_evaluation else contextlib.nullcontext()
        with dropout, bayeslora.sampling(model, "sample", seed=seed, hold=True):
            yield
