"""bayeslora: Bayesian-LoRA adapters for Hugging Face causal LMs, with calibrated evaluation."""

import warnings

from peft.utils import PeftWarning

from bayeslora.adapter import (
    bayesian_factors,
    export_mean_lora,
    get_bayeslora_model,
    is_bayesian,
    kl_divergence,
    load_bayeslora_model,
    sampling,
)
from bayeslora.config import BayesLoraConfig
from bayeslora.inducing import InducingFactor

# peft takes any 1-D tensor under lora_A / lora_B for an ungathered ZeRO-3 shard and warns at save time;
# an inducing factor legitimately holds 1-D parameters (D_r, D_c, lambda, the flow's biases).
warnings.filterwarnings(
    "ignore",
    message=r"Adapter .* LoRA tensor\(s\) have invalid shape: .*(_raw|\.flow\.)",
    category=PeftWarning,
)


def __getattr__(name: str):
    """`load_run` and `LoadedRun` on first use: `bayeslora.runs` imports the methods, which the protocol
    modules (`bayeslora.predictive`, `scoring`, ...) importing this package must not pull in."""
    if name in ("LoadedRun", "load_run"):
        from bayeslora import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'bayeslora' has no attribute {name!r}")


__all__ = [
    "BayesLoraConfig",
    "InducingFactor",
    "LoadedRun",
    "bayesian_factors",
    "export_mean_lora",
    "get_bayeslora_model",
    "is_bayesian",
    "kl_divergence",
    "load_bayeslora_model",
    "load_run",
    "sampling",
]
