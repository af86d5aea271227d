"""`BayesLoraLinear`: peft's LoRA Linear layer whose factors on Bayesian targets are `InducingFactor`s.

Registered for `nn.Linear` through peft's custom-module extension point
(`LoraConfig._register_custom_module`, done by `BayesLoraConfig`). On targets
that are not Bayesian it is exactly peft's `lora.Linear`. On Bayesian targets
`lora_A[adapter]` and `lora_B[adapter]` are `InducingFactor`s: modules that
draw their weight inside their own forward, so the LoRA update keeps peft's
form `scaling * B(A(dropout(x)))` with B and A random.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear

from bayeslora.inducing import InducingFactor
from bayeslora.kl_guard import watch_for_missing_kl


class BayesLoraLinear(LoraLinear):
    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        is_bayesian_module = getattr(config, "is_bayesian_module", None)
        if is_bayesian_module is None or not is_bayesian_module(kwargs.get("target_name", "")):
            return
        device = self.get_base_layer().weight.device
        settings = config.factor_settings()
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
        return delta.to(self.get_base_layer().weight.dtype)
