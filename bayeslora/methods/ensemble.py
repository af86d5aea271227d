"""Deep ensemble of LoRA adapters: M independently trained members, mean of their softmaxes.

Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty
Estimation using Deep Ensembles", NeurIPS 2017; the LoRA-ensemble baseline of
Wang et al., "LoRA ensembles for large language model fine-tuning" (2023) and
of the Laplace-LoRA and BLoB tables.

The M members (default 3) are M peft adapters `member_0 .. member_{M-1}` on one
frozen base model, so the base weights are held once. Their initial values are
drawn one after the other from the RNG the loop seeded before `prepare`, so
they differ and are reproducible. Through the `members` hook the training loop
trains each member in turn (only the active adapter requires grad, peft's
`set_adapter`), with its own seed and data order; while a member trains, its
draws are that member alone, so the loop's per-epoch selection judges it. Prediction: one draw per
member (the member is the sample), so an ensemble always uses M samples,
whatever N the other sampling methods use; the predictive averages the M
softmaxes like any other draw set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, ContextManager

from peft import PeftModel
from torch import nn

from bayeslora.errors import check_count
from bayeslora.methods.base import Method, register_method
from bayeslora.methods.lora import lora_config, plain_lora


def member_name(index: int) -> str:
    return f"member_{index}"


@contextlib.contextmanager
def active_member(model: PeftModel, index: int) -> Iterator[None]:
    """Inside: adapter `member_<index>` is the one that runs and trains; the adapter active before is active again after."""
    previous = model.active_adapter
    model.set_adapter(member_name(index))
    try:
        yield
    finally:
        model.set_adapter(previous)


@register_method
class Ensemble(Method):
    name: ClassVar[str] = "ensemble"
    default_samples: ClassVar[int] = 3
    needs_run_folder: ClassVar[bool] = True  # M adapters: peft saves member_k in the subfolder member_k/

    def __init__(self, members: int = 3, **options: Any) -> None:
        check_count("ensemble members", members)
        super().__init__(**options)
        self.n_members = members
        self.training_member: int | None = None  # set inside `members`: the one being trained

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        peft_model = plain_lora(model, lora, adapter_name=member_name(0))
        for index in range(1, self.n_members):
            peft_model.add_adapter(member_name(index), lora_config(lora))
        peft_model.set_adapter(member_name(0))
        return peft_model

    def members(self, model: nn.Module) -> Iterator[ContextManager]:
        for index in range(self.n_members):
            yield self._training(model, index)

    @contextlib.contextmanager
    def _training(self, model: nn.Module, index: int) -> Iterator[None]:
        self.training_member = index
        try:
            with active_member(model, index):
                yield
        finally:
            self.training_member = None

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        """One context per member (`n_samples` does not apply: the members are the samples). While a member
        trains, only that member: the loop's per-epoch model selection then judges the member itself."""
        indices = range(self.n_members) if self.training_member is None else [self.training_member]
        for index in indices:
            yield active_member(model, index)
