"""`BayesLoraTrainer`: transformers' Trainer plus the KL term, its schedules, logging and peft-format saves."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

import bayeslora
from bayeslora.integrations.trainer import BayesLoraTrainer, KLSchedule, predictive_spread
from bayeslora.kl_guard import MissingKLWarning
from tests._integrations_support import (  # noqa: F401 (fresh_accelerate_state is an autouse fixture)
    fresh_accelerate_state,
    MODEL,
    fixture_bayeslora_model,
    fixture_tokenizer,
    posterior_state,
    tokenized_dataset,
    training_logs,
)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(max_steps=2, per_device_train_batch_size=8, logging_steps=1, learning_rate=1e-2, seed=7,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    return TrainingArguments(str(tmp_path), **{**settings, **overrides})


def make_trainer(trainer_class, tmp_path, model, tokenizer, **kwargs):
    return trainer_class(model=model, args=arguments(tmp_path, **kwargs.pop("args", {})),
                         train_dataset=tokenized_dataset(tokenizer),
                         data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), **kwargs)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_steps_move_the_posterior_and_the_logged_loss_is_nll_plus_kl(tmp_path, accumulation):
    tokenizer = fixture_tokenizer()
    model = fixture_bayeslora_model()
    before = posterior_state(model)
    kl_before = bayeslora.kl_divergence(model).item()  # flow off: exact, no sampling
    n_train = len(tokenized_dataset(tokenizer))
    trainer = make_trainer(BayesLoraTrainer, tmp_path / "bayes", model, tokenizer, kl=KLSchedule(beta=2.0),
                           args={"gradient_accumulation_steps": accumulation, "per_device_train_batch_size": 8 // accumulation})
    trainer.train()

    after = posterior_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before if "u_mean" in name)
    assert any(not torch.equal(before[name], after[name]) for name in before if "lambda_raw" in name)
    first, second = training_logs(trainer)
    assert first["kl"] == pytest.approx(kl_before, rel=1e-5)
    assert second["kl"] != pytest.approx(kl_before, rel=1e-6)  # the posterior moved
    for record in (first, second):
        assert record["beta"] == pytest.approx(2.0)
        assert record["loss"] == pytest.approx(record["nll"] + 2.0 * record["kl"] / n_train, rel=1e-5)
        assert record["lambda_mean"] > 0 and record["mutual_information"] >= 0
    # the posterior's state is logged after the step: the last log's parts are the trained model's KL
    assert second["kl_inducing"] + second["kl_conditional"] == pytest.approx(bayeslora.kl_divergence(model).item(), rel=1e-5)

    # the same steps in a plain Trainer log the NLL alone, and warn that the KL is missing
    plain = make_trainer(Trainer, tmp_path / "plain", fixture_bayeslora_model(), tokenizer,
                         args={"gradient_accumulation_steps": accumulation, "per_device_train_batch_size": 8 // accumulation})
    with pytest.warns(MissingKLWarning, match="without their KL term"):
        plain.train()
    assert training_logs(plain)[0]["loss"] == pytest.approx(first["nll"], rel=1e-5)


def test_the_kl_follows_the_schedules_of_bayeslora_train(tmp_path):
    tokenizer = fixture_tokenizer()
    # 48 examples, batch 16: 3 optimizer steps per epoch. Released weighting: 0.1 * KL / 3 from the third epoch.
    released = make_trainer(BayesLoraTrainer, tmp_path / "released", fixture_bayeslora_model(), tokenizer,
                            kl=KLSchedule(weighting="released", spread_samples=0),
                            args={"max_steps": 7, "per_device_train_batch_size": 16})
    released.train()
    logs = training_logs(released)
    assert [record["beta"] for record in logs] == pytest.approx([0.0] * 6 + [0.1])
    assert logs[0]["loss"] == pytest.approx(logs[0]["nll"], rel=1e-6)
    assert logs[6]["loss"] == pytest.approx(logs[6]["nll"] + 0.1 * logs[6]["kl"] / 3, rel=1e-5)
    assert "mutual_information" not in logs[0]
    # beta weighting with a 4-step linear warm-up and an explicit divisor
    ramped = make_trainer(BayesLoraTrainer, tmp_path / "ramped", fixture_bayeslora_model(), tokenizer,
                          kl=KLSchedule(beta=1.0, warmup=4, n_train=1000), args={"max_steps": 3})
    ramped.train()
    logs = training_logs(ramped)
    assert [record["beta"] for record in logs] == pytest.approx([0.25, 0.5, 0.75])
    assert logs[2]["loss"] == pytest.approx(logs[2]["nll"] + 0.75 * logs[2]["kl"] / 1000, rel=1e-5)


def test_saved_adapter_restores_with_load_bayeslora_model(tmp_path):
    tokenizer = fixture_tokenizer()
    model = fixture_bayeslora_model()
    trainer = make_trainer(BayesLoraTrainer, tmp_path / "run", model, tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    restored = bayeslora.load_bayeslora_model(AutoModelForCausalLM.from_pretrained(MODEL), tmp_path / "adapter")
    batch = tokenizer(["Question: What is 2 plus 2?\nAnswer: 4"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        for mode, seed in (("mean", None), ("sample", 3)):
            with bayeslora.sampling(model, mode, seed=seed), bayeslora.sampling(restored, mode, seed=seed):
                assert torch.equal(model(**batch).logits, restored(**batch).logits)


def test_weight_decay_skips_the_posterior_parameters(tmp_path):
    tokenizer = fixture_tokenizer()
    # q_proj Bayesian, v_proj plain LoRA
    model = fixture_bayeslora_model(bayesian_modules=["q_proj"])
    trainer = make_trainer(BayesLoraTrainer, tmp_path, model, tokenizer, args={"weight_decay": 0.1})
    trainer.create_optimizer()
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    posterior = {id(p) for factor in bayeslora.bayesian_factors(model) for p in factor.parameters()}
    plain = {id(p) for name, p in model.named_parameters() if "v_proj.lora_" in name}
    assert posterior and plain and decayed == plain


def test_predictive_spread_is_the_mutual_information_of_the_draws():
    model = fixture_bayeslora_model(prior_sd=1.0, lambda_init=0.3, max_lambda=0.3, sd_init=0.5, max_sd_u=1.0).train()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]),
              "labels": torch.tensor([[5, 6, 7, 8], [-100, -100, 9, 10]])}
    spread = predictive_spread(model, inputs, n_samples=3, seed=11)
    assert model.training  # restored
    model.eval()
    probs = []
    with torch.no_grad():
        for seed in (11, 12, 13):
            with bayeslora.sampling(model, "sample", seed=seed, hold=True):
                probs.append(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.softmax(-1))
    probs = torch.stack(probs).double()
    mixture = probs.mean(0)
    information = -(mixture * mixture.log()).sum(-1) + (probs * probs.log()).sum(-1).mean(0)
    expected = information[inputs["attention_mask"].bool()].mean().item()
    assert expected > 1e-4
    assert spread == pytest.approx(expected, rel=1e-3)


def test_kl_schedule_and_model_are_checked():
    with pytest.raises(ValueError, match="unknown KL weighting 'elbo'"):
        KLSchedule(weighting="elbo")
    with pytest.raises(ValueError, match="spread_samples"):
        KLSchedule(spread_samples=1)
    with pytest.raises(ValueError, match="needs a model with Bayesian-LoRA factors"):
        BayesLoraTrainer(model=AutoModelForCausalLM.from_pretrained(MODEL),
                         args=TrainingArguments("unused", use_cpu=True, report_to=[]))


def test_a_loss_with_the_kl_does_not_warn():
    model = fixture_bayeslora_model().train()
    ids = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingKLWarning)
        (model(ids).logits.mean() + bayeslora.kl_divergence(model) / 100).backward()


def test_trainer_checkpoints_hold_the_posterior_and_training_resumes_from_them(tmp_path):
    tokenizer = fixture_tokenizer()
    model = fixture_bayeslora_model()
    make_trainer(BayesLoraTrainer, tmp_path / "run", model, tokenizer,
                 args={"save_strategy": "steps", "save_steps": 2}).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    restored = bayeslora.load_bayeslora_model(AutoModelForCausalLM.from_pretrained(MODEL), checkpoint)
    for name, value in posterior_state(model).items():
        assert torch.equal(value, restored.get_parameter(name))
    resumed = make_trainer(BayesLoraTrainer, tmp_path / "run", fixture_bayeslora_model(seed=1), tokenizer,
                           args={"max_steps": 3})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    record = training_logs(resumed)[-1]  # the history before the checkpoint comes back with it
    assert record["step"] == 3 and record["kl"] > 0
    assert record["loss"] == pytest.approx(record["nll"] + record["kl"] / len(tokenized_dataset(tokenizer)), rel=1e-5)
