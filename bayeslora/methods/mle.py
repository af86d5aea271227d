"""MLE: plain LoRA trained by maximum likelihood (no weight decay).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
The reference point of every table: one deterministic adapter, the training
loss is the mean task NLL alone, the predictive is a single softmax.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from bayeslora.methods.base import Method, register_method
from bayeslora.methods.lora import plain_lora


@register_method
class MLE(Method):
    name: ClassVar[str] = "mle"
    weight_decay: ClassVar[float] = 0.0

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        return plain_lora(model, lora)
