"""peft's LoRA linear layers whose factors on Bayesian targets are `InducingFactor`s.

Registered through peft's custom-module extension point
(`LoraConfig._register_custom_module`, done by `BayesLoraConfig`, see
`custom_layers`): `BayesLoraLinear` for `nn.Linear`, and, when bitsandbytes is
installed, Bayesian versions of peft's own 4-bit and 8-bit LoRA layers for a
quantised base model. On targets that are not Bayesian each is exactly its
peft layer. On Bayesian targets `lora_A[adapter]` and `lora_B[adapter]` are
`InducingFactor`s (fp32 parameters, whatever the base model's dtype): modules
that draw their weight inside their own forward, so the LoRA update keeps
peft's form `scaling * B(A(dropout(x)))` with B and A random.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from bayeslora.inducing import InducingFactor
from bayeslora.kl_guard import watch_for_missing_kl


class BayesianFactors:
    """Mixin over a peft LoRA linear layer class: the adapters of Bayesian targets get inducing-weight factors."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        self.make_bayesian(adapter_name, config, kwargs.get("target_name", ""))

    def make_bayesian(self, adapter_name: str, config: Any, target_name: str) -> None:
        """Replace the adapter's factors by inducing-weight factors if `target_name` is a Bayesian module."""
        is_bayesian_module = getattr(config, "is_bayesian_module", None)
        if is_bayesian_module is None or not is_bayesian_module(target_name) or self.is_bayesian_adapter(adapter_name):
            return
        device = self.get_base_layer().weight.device
        settings = config.factor_settings()
        r = self.r[adapter_name]
        self.lora_A[adapter_name] = InducingFactor(r, self.in_features, **settings).to(device)
        self.lora_B[adapter_name] = InducingFactor(self.out_features, r, **settings).to(device)
        watch_for_missing_kl(self.lora_A[adapter_name])
        # the new factors must follow peft's trainable / frozen state of this adapter
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def is_bayesian_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_A and isinstance(self.lora_A[adapter_name], InducingFactor)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # peft's forward reads `lora_A[adapter].weight`, which a random factor does not have: Bayesian
        # adapters take this path, everything else (disabled, merged, plain LoRA) is peft's own.
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not any(self.is_bayesian_adapter(a) for a in active):
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError("per-example adapter_names is not supported for Bayesian LoRA adapters")
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in active:
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            h = self.lora_dropout[adapter](x)
            if not self.is_bayesian_adapter(adapter):
                h = self._cast_input_dtype(h, lora_a.weight.dtype)
            result = result + lora_b(lora_a(h)) * self.scaling[adapter]
        return result.to(result_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """For a Bayesian adapter, the update of the posterior-mean factors (what merging bakes in)."""
        if not self.is_bayesian_adapter(adapter):
            return super().get_delta_weight(adapter)
        delta = self.lora_B[adapter].mean_weight() @ self.lora_A[adapter].mean_weight() * self.scaling[adapter]
        delta = delta.T if self.fan_in_fan_out else delta
        weight = self.get_base_layer().weight
        # a quantised weight is stored as integers: peft's bnb merge dequantises and adds the delta itself
        return delta.to(weight.dtype) if weight.is_floating_point() else delta


class BayesLoraLinear(BayesianFactors, LoraLinear):
    """peft's `lora.Linear` with inducing-weight factors on Bayesian targets."""


def _over_quantised(peft_layer: type) -> type:
    """A Bayesian version of one of peft's bitsandbytes LoRA layers.

    peft's bnb layers do not pass the target's name on to `update_layer`, so the factors are made Bayesian
    once the layer is built.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, target_name: str = "", **kwargs: Any):
        peft_layer.__init__(self, base_layer, adapter_name, config=config, **kwargs)
        self.make_bayesian(adapter_name, config, target_name)

    name = f"BayesLora{peft_layer.__name__}"
    return type(name, (BayesianFactors, peft_layer), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


@functools.cache
def custom_layers() -> dict[type, type]:
    """peft's custom-module mapping: base layer class -> Bayesian LoRA layer class, most specific first.

    bitsandbytes' quantised linear layers subclass `nn.Linear`, so they come before it.
    """
    layers: dict[type, type] = {}
    if is_bnb_available():
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as peft_bnb

        layers[bnb.nn.Linear8bitLt] = _over_quantised(peft_bnb.Linear8bitLt)
        if is_bnb_4bit_available():
            layers[bnb.nn.Linear4bit] = _over_quantised(peft_bnb.Linear4bit)
    layers[nn.Linear] = BayesLoraLinear
    return layers
