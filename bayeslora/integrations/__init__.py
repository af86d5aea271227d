"""Bayesian-LoRA inside other libraries' loops.

- `bayeslora.integrations.trainer`: Hugging Face `Trainer` (the KL term, one held draw per step, logging);
- `bayeslora.integrations.sft`: the same for TRL's `SFTTrainer` (extra `trl`);
- `bayeslora.integrations.lm_eval`: an lm-evaluation-harness model scored with the posterior predictive
  (extra `lm-eval`).

Each module imports its library on import, so nothing here is loaded by `import bayeslora`.
"""
