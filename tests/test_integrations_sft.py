"""`BayesLoraSFTTrainer`: TRL's SFTTrainer plus the KL term (skipped without the `trl` extra)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

import bayeslora
from bayeslora.integrations.trainer import KLSchedule
from tests._integrations_support import MODEL, fixture_bayeslora_model, fixture_texts, fixture_tokenizer, posterior_state, training_logs
from tests._integrations_support import fresh_accelerate_state  # noqa: F401 (an autouse fixture)

trl = pytest.importorskip("trl")
from bayeslora.integrations.sft import BayesLoraSFTTrainer  # noqa: E402


def sft_config(path, **overrides):
    settings = dict(max_steps=2, per_device_train_batch_size=8, logging_steps=1, learning_rate=1e-2, seed=7,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32)
    return trl.SFTConfig(str(path), **{**settings, **overrides})


def test_sft_steps_move_the_posterior_log_the_kl_and_save_a_restorable_adapter(tmp_path):
    tokenizer = fixture_tokenizer()
    model = fixture_bayeslora_model()
    before = posterior_state(model)
    kl_before = bayeslora.kl_divergence(model).item()
    data = Dataset.from_dict({"text": fixture_texts()})
    trainer = BayesLoraSFTTrainer(model=model, args=sft_config(tmp_path / "run"), train_dataset=data,
                                  processing_class=tokenizer, kl=KLSchedule(beta=2.0))
    trainer.train()

    after = posterior_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before if "u_mean" in name)
    first, second = training_logs(trainer)
    assert first["kl"] == pytest.approx(kl_before, rel=1e-5)
    for record in (first, second):
        assert record["loss"] == pytest.approx(record["nll"] + 2.0 * record["kl"] / len(data), rel=1e-5)
        assert "mean_token_accuracy" in record  # TRL's own metrics are still logged

    trainer.save_model(str(tmp_path / "adapter"))
    restored = bayeslora.load_bayeslora_model(AutoModelForCausalLM.from_pretrained(MODEL), tmp_path / "adapter")
    # parameters, not logits: SFTConfig trains under bf16 autocast (its default), which stays on the trained model's forward
    assert posterior_state(model).keys() == dict(restored.named_parameters()).keys() - {
        name for name, p in restored.named_parameters() if "lora_" not in name}
    for name, value in posterior_state(model).items():
        assert torch.equal(value, restored.get_parameter(name))


def test_sft_with_a_bayeslora_peft_config_trains_the_factors(tmp_path):
    tokenizer = fixture_tokenizer()
    config = bayeslora.BayesLoraConfig(r=4, target_modules=["q_proj", "v_proj"], flow=False)
    trainer = BayesLoraSFTTrainer(model=AutoModelForCausalLM.from_pretrained(MODEL), peft_config=config,
                                  args=sft_config(tmp_path / "run", max_steps=1), processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"text": fixture_texts()}))
    assert bayeslora.is_bayesian(trainer.model)
    trainer.train()
    (record,) = training_logs(trainer)
    assert record["kl"] > 0 and record["loss"] == pytest.approx(record["nll"] + record["kl"] / 48, rel=1e-5)
