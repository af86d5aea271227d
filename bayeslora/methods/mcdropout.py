"""MC-Dropout: LoRA dropout kept active at test time, averaged over N masks.

Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016, applied to
the LoRA branch as in the baselines of Laplace-LoRA and BLoB. Training is plain
LoRA with dropout p on the adapter input (default 0.1; the `lora_dropout` of
the shared adapter description is used instead when it is non-zero). At test
time each predictive sample switches *only* the LoRA dropout modules to train
mode (the base model stays in eval mode, so no other stochasticity leaks in)
and reseeds the torch RNG with `seed + s`, so a sample is reproducible. A
fresh mask is drawn at every forward, per token, as dropout always does; the
choices of one question therefore see different masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, ContextManager

import torch
from torch import nn

from bayeslora.methods.base import PREDICTIVE_SAMPLES, register_method
from bayeslora.methods.mle import MLE
from bayeslora.methods.lora import plain_lora


def lora_dropout_modules(model: nn.Module) -> list[nn.Dropout]:
    """The dropout layers peft places on LoRA inputs (`...lora_dropout.<adapter>`)."""
    return [module for name, module in model.named_modules() if ".lora_dropout." in name and isinstance(module, nn.Dropout)]


@contextlib.contextmanager
def active_lora_dropout(model: nn.Module, seed: int) -> Iterator[None]:
    """Inside: LoRA dropout on (everything else untouched) and the CPU/CUDA RNGs seeded with `seed`."""
    modules = lora_dropout_modules(model)
    modes = [module.training for module in modules]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in modules:
            module.train()
        try:
            yield
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)


@register_method
class MCDropout(MLE):
    name: ClassVar[str] = "mcdropout"
    default_samples: ClassVar[int] = PREDICTIVE_SAMPLES

    def __init__(self, dropout: float = 0.1, **options: Any) -> None:
        super().__init__(**options)
        self.dropout = dropout

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        return plain_lora(model, lora, lora_dropout=lora.get("lora_dropout") or self.dropout)

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        for sample in range(self.sample_count(n_samples)):
            yield active_lora_dropout(model, seed + sample)
