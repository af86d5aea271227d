"""Hugging Face `Trainer` with the Bayesian-LoRA objective.

    from transformers import TrainingArguments
    from bayeslora.integrations.trainer import BayesLoraTrainer, KLSchedule

    model = bayeslora.get_bayeslora_model(base, bayeslora.BayesLoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = BayesLoraTrainer(model=model, args=TrainingArguments("out"), train_dataset=data,
                               kl=KLSchedule(beta=1.0, warmup=100))
    trainer.train()
    trainer.save_model("out/adapter")        # bayeslora.load_bayeslora_model(base, "out/adapter") restores it

Per training micro-batch the loss is the Trainer's own (the model's token NLL, or whatever the
trainer computes) plus the KL term of the ELBO,

    loss = task loss + w(step) * KL / divisor

with `w` and `divisor` from `bayeslora.schedules.KLWeighting`, the schedules of `bayeslora train`:
`beta` weighting (default) is `beta * ramp * KL / N_train`, `released` is the authors' code's
`0.1 * KL / steps_per_epoch` from the second epoch. `N_train` defaults to the number of training
examples; the Trainer's loss is a mean per token, so pass `n_train=` the number of training
tokens for the per-token ELBO. The KL enters each micro-batch scaled so that it counts once per
optimizer step, whatever the gradient accumulation, and under DDP once overall (gradients are
averaged). Each micro-batch's forward and backward passes see one posterior draw, held, so
activation checkpointing recomputes with the same draw.

Logged with the Trainer's `loss`, as means since the previous log like the loss: `nll` (the task
loss alone), `kl` (nats, summed over factors), `beta` (w) and `mutual_information`: the predictive
spread, `H[mean_s p_s] - mean_s H[p_s]` of the next-token distributions of `spread_samples` seeded
posterior draws (nats per non-padding position, dropout off), computed on the first micro-batch of
every logging step. With them, the posterior's state at the log (`bayeslora.diagnostics.posterior_state`:
`lambda_mean`, `lambda_max`, `sd_mean`, `sd_max`, `kl_inducing`, `kl_conditional`,
`relative_update/<module>`). The names are those of `train_log.jsonl`.

`args.weight_decay` applies to the plain LoRA factors only, not to the posterior's parameters,
which the KL regularises already (as in `bayeslora train`).

`BayesLoraTrainerMixin` adds all this to any `Trainer` subclass (`bayeslora.integrations.sft` does
it for TRL's `SFTTrainer`). Evaluation inside the Trainer (`eval_loss`) uses one fresh draw per
forward and no KL; score the posterior predictive with `bayeslora evaluate` or lm-eval instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer

import bayeslora
from bayeslora.adapter import bayesian_factors, draw_all_factors
from bayeslora.diagnostics import posterior_state
from bayeslora.predictive import entropy, log_mean_exp
from bayeslora.schedules import KL_WEIGHTINGS, KLWeighting
from bayeslora.tracking import scalars

LOGGED = ("nll", "kl", "beta")


@dataclass(frozen=True)
class KLSchedule:
    """How the KL enters the loss: the settings of `bayeslora train` of the same names."""

    weighting: str = "beta"  # one of KL_WEIGHTINGS
    beta: float = 1.0
    warmup: int = 0  # linear KL ramp length, in `warmup_unit`s; 0 = none
    warmup_unit: str = "steps"  # or "epochs"
    n_train: int | None = None  # the KL divisor of `beta` weighting; None = the number of training examples
    spread_samples: int = 2  # posterior draws for the logged mutual information; 0 = do not log it

    def __post_init__(self) -> None:
        if self.weighting not in KL_WEIGHTINGS:
            raise ValueError(f"unknown KL weighting {self.weighting!r}; valid: {', '.join(KL_WEIGHTINGS)}")
        if self.warmup_unit not in ("steps", "epochs"):
            raise ValueError(f"warmup_unit must be 'steps' or 'epochs', got {self.warmup_unit!r}")
        if self.beta < 0 or self.warmup < 0:
            raise ValueError(f"beta and warmup must be >= 0, got beta={self.beta}, warmup={self.warmup}")
        if self.n_train is not None and self.n_train < 1:
            raise ValueError(f"n_train must be a positive number of training examples, got {self.n_train}")
        if self.spread_samples < 0 or self.spread_samples == 1:
            raise ValueError(f"spread_samples must be 0 (off) or at least 2, got {self.spread_samples}")


def predictive_spread(model: nn.Module, inputs: dict[str, Any], n_samples: int, seed: int) -> float:
    """Mean next-token mutual information (nats) over the non-padding positions of `inputs`, dropout off."""
    model_inputs = {key: value for key, value in inputs.items() if key not in ("labels", "num_items_in_batch")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            draws = []
            for sample in range(n_samples):
                with bayeslora.sampling(model, "sample", seed=seed + sample, hold=True):
                    draws.append(model(**model_inputs).logits.float().log_softmax(-1))
    finally:
        model.train(was_training)
    log_probs = torch.stack(draws)  # [S, B, T, V]
    # clamped as in `bayeslora.predictive`: rounding must not make it negative
    information = (entropy(log_mean_exp(log_probs, dim=0)) - entropy(log_probs).mean(0)).clamp(min=0)  # [B, T]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(information) if mask is None else mask.to(information.dtype)
    return ((information * mask).sum() / mask.sum().clamp(min=1)).item()


class BayesLoraTrainerMixin:
    """Put before a `transformers.Trainer` subclass: `class MyTrainer(BayesLoraTrainerMixin, Trainer)`."""

    def __init__(self, *args: Any, kl: KLSchedule | None = None, **kwargs: Any) -> None:
        self.kl_schedule = kl if kl is not None else KLSchedule()
        super().__init__(*args, **kwargs)
        if not bayeslora.is_bayesian(self.model):
            raise ValueError(f"{type(self).__name__} needs a model with Bayesian-LoRA factors "
                             "(bayeslora.get_bayeslora_model, or peft_config=BayesLoraConfig(...))")
        self.kl_weighting: KLWeighting | None = None  # set when training starts (it needs the epoch length)
        self._sums = dict.fromkeys(LOGGED, 0.0)
        self._spreads: list[float] = []
        self._spread_step = -1
        self._steps_since_log: set[int] = set()  # optimizer steps whose micro-batches are in `_sums`

    # ----- the KL schedule needs the number of optimizer steps per epoch ---------------------------
    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        steps_per_epoch = values[1]
        schedule = self.kl_schedule
        self.kl_weighting = KLWeighting(schedule.weighting, schedule.beta, schedule.warmup, schedule.warmup_unit,
                                        schedule.n_train or self._training_examples(), steps_per_epoch)
        return values

    def _training_examples(self) -> int:
        try:
            return len(self.train_dataset)
        except TypeError:
            raise ValueError("the training dataset has no length: pass KLSchedule(n_train=...)") from None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's weight-decayed parameters, less the posterior's: the KL regularises those already."""
        posterior = {id(p) for factor in bayesian_factors(model) for p in factor.parameters()}
        return [name for name in super().get_decay_parameter_names(model) if id(model.get_parameter(name)) not in posterior]

    # ----- one held draw per micro-batch, KL added to the loss --------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        step = self.state.global_step
        samples = self.kl_schedule.spread_samples
        if samples and step != self._spread_step and step % self.state.logging_steps == 0:
            self._spread_step = step  # once per logged step, on its first micro-batch
            self._spreads.append(predictive_spread(self.model, self._prepare_inputs(inputs), samples, seed=step))
        # one draw of every factor, made here, outside any activation-checkpointed block, and held through the
        # forward and backward passes: recomputation reuses it instead of drawing inside the checkpoint
        with bayeslora.sampling(self.model, "sample", hold=True):
            draw_all_factors(self.model)
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        if not model.training:  # evaluation inside the Trainer: the task loss only
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        step = self.state.global_step
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        task_loss, outputs = result if return_outputs else (result, None)

        weight = self.kl_weighting.weight(step)
        kl = bayeslora.kl_divergence(self.model)
        micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        # the Trainer divides a per-micro-batch loss by the accumulation steps itself, not a pre-scaled one
        divided_by_trainer = not self._loss_is_scaled_for_accumulation(num_items_in_batch)
        kl_share = 1.0 if divided_by_trainer else 1.0 / micro_batches
        loss = task_loss + kl_share * weight * kl / self.kl_weighting.divisor

        task_share = 1.0 / micro_batches if divided_by_trainer else 1.0  # as the logged `loss` counts it
        for name, value in (("nll", task_loss.detach().float().mean().item() * task_share),
                            ("kl", kl.item() / micro_batches), ("beta", weight / micro_batches)):
            self._sums[name] += value
        self._steps_since_log.add(step)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """The rule of `Trainer.training_step`: is the loss already normalised over the accumulated batch?"""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # ----- logging ---------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        steps = len(self._steps_since_log)
        if "loss" in logs and steps > 0:  # a training log: means since the previous one
            means = torch.tensor([self._sums[name] / steps for name in LOGGED], device=self.args.device)
            means = self.accelerator.reduce(means, reduction="mean")
            logs = {**logs, **dict(zip(LOGGED, means.tolist())), **scalars(posterior_state(self.model))}
            if self._spreads:
                logs["mutual_information"] = sum(self._spreads) / len(self._spreads)
            self._sums = dict.fromkeys(LOGGED, 0.0)
            self._spreads = []
            self._steps_since_log = set()
        super().log(logs, start_time)


class BayesLoraTrainer(BayesLoraTrainerMixin, Trainer):
    """`transformers.Trainer` training a Bayesian-LoRA model by variational inference (see the module docstring)."""
