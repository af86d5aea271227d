"""TRL's `SFTTrainer` with the Bayesian-LoRA objective (needs the `trl` extra).

    from trl import SFTConfig
    from bayeslora.integrations.sft import BayesLoraSFTTrainer
    from bayeslora.integrations.trainer import KLSchedule

    model = bayeslora.get_bayeslora_model(base, bayeslora.BayesLoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = BayesLoraSFTTrainer(model=model, args=SFTConfig("out"), train_dataset=data,
                                  processing_class=tokenizer, kl=KLSchedule(beta=1.0))

Everything `BayesLoraTrainer` does (KL term and schedules, one held draw per step, logging,
peft-format saves) on top of TRL's supervised fine-tuning. `peft_config=BayesLoraConfig(...)` with a
plain base model works too: TRL wraps it with peft's `get_peft_model`, which skips
`get_bayeslora_model`'s check that every `bayesian_modules` entry names a target; training draws
are the same, and forward passes outside training draw factor by factor (a little slower).
"""

from trl import SFTTrainer

from bayeslora.integrations.trainer import BayesLoraTrainerMixin


class BayesLoraSFTTrainer(BayesLoraTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` training a Bayesian-LoRA model by variational inference."""
