"""The committed fixture model and its arithmetic questions as a causal-LM dataset, for the Trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import bayeslora

FIXTURE = Path(__file__).resolve().parents[1] / "bayeslora" / "fixtures" / "smoke"
MODEL = FIXTURE / "model"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A Trainer sets accelerate's process-wide state (bf16 mixed precision under SFTConfig's defaults);
    later tests that build an `Accelerator` in this process must not inherit it."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fixture_texts() -> list[str]:
    rows = [json.loads(line) for line in (FIXTURE / "arith_train.jsonl").read_text().splitlines()]
    return [f"Question: {row['question']}\nAnswer: {row['choices'][row['answer']]}" for row in rows]


def fixture_tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def tokenized_dataset(tokenizer) -> Dataset:
    return Dataset.from_dict({"text": fixture_texts()}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])


def fixture_bayeslora_model(seed: int = 0, **settings):
    """The fixture model with Bayesian factors on q_proj and v_proj (flow off: the KL is exact, not sampled)."""
    torch.manual_seed(seed)
    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       **{"flow": False, **settings})
    return bayeslora.get_bayeslora_model(AutoModelForCausalLM.from_pretrained(MODEL), config)


def posterior_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def training_logs(trainer) -> list[dict]:
    return [record for record in trainer.state.log_history if "loss" in record]
