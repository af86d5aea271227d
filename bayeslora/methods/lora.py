"""Plain peft LoRA, the adapter every LoRA-based baseline starts from.

`lora` is the method-independent adapter description the training loop hands
to `Method.prepare`: r, lora_alpha, lora_dropout and target_modules. The
scaling alpha/r, the initialisation (A Kaiming-uniform, B = 0) and the frozen
base layer are peft's own.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules")


def lora_config(lora: dict[str, Any], **overrides: Any) -> LoraConfig:
    """A causal-LM `LoraConfig` from the shared adapter description; `overrides` replace its entries."""
    settings = {key: lora[key] for key in LORA_KEYS if key in lora}
    settings.update(overrides)
    return LoraConfig(task_type="CAUSAL_LM", **settings)


def plain_lora(model: nn.Module, lora: dict[str, Any], adapter_name: str = "default", **overrides: Any) -> PeftModel:
    """Wrap `model` with one plain LoRA adapter."""
    return get_peft_model(model, lora_config(lora, **overrides), adapter_name=adapter_name)
