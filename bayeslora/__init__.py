"""bayeslora: Bayesian-LoRA adapters for Hugging Face causal LMs, with calibrated evaluation."""
