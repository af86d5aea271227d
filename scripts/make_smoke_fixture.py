"""Builds bayeslora/fixtures/smoke/: the tiny model and data of `bayeslora compare --preset smoke`.

    PYTHONPATH=. python scripts/make_smoke_fixture.py

- `model/`: a randomly initialised 2-layer Llama (hidden 32) with a word-level
  tokenizer over the fixture's own words (`tokenizers`), saved with
  save_pretrained (safetensors), ~100 KB. Seeded: rebuilding gives the same files.
- `arith_{train,validation,test}.jsonl`: "What is a plus b?" with 2-4 numeric
  choices (varying counts exercise choice padding); `shift_{test,validation}.jsonl`:
  "What is a times b?", the out-of-distribution set of the smoke preset.
  The registry serves them as the tasks `smoke_arith` and `smoke_shift`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FIXTURE = Path(__file__).resolve().parents[1] / "bayeslora" / "fixtures" / "smoke"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def questions(operation: str, count: int, rng: random.Random, prefix: str) -> list[dict]:
    rows = []
    for index in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        answer = a + b if operation == "plus" else a * b
        wrong = rng.sample(sorted({answer + d for d in (-3, -2, -1, 1, 2, 3)} - {answer}), rng.randint(1, 3))
        choices = [answer, *wrong]
        rng.shuffle(choices)
        rows.append({"id": f"{prefix}-{index}", "question": f"What is {a} {operation} {b}?",
                     "choices": [str(c) for c in choices], "answer": choices.index(answer)})
    return rows


def main() -> None:
    rng = random.Random(0)
    data = {
        "arith_train.jsonl": questions("plus", 48, rng, "train"),
        "arith_validation.jsonl": questions("plus", 16, rng, "validation"),
        "arith_test.jsonl": questions("plus", 24, rng, "test"),
        "shift_test.jsonl": questions("times", 16, rng, "shift"),
        "shift_validation.jsonl": questions("times", 8, rng, "shift-validation"),
    }
    FIXTURE.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        (FIXTURE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    words = {"Question", ":", "Answer", "?", "What", "is", "plus", "times", "\n"} | {str(n) for n in range(100)}
    vocabulary = {token: index for index, token in enumerate(SPECIAL + sorted(words))}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", padding_side="left")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(FIXTURE / "model")
    fast.save_pretrained(FIXTURE / "model")


if __name__ == "__main__":
    main()
