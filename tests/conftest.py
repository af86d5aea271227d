"""Shared test fixtures: tiny random causal LMs that build in milliseconds on CPU."""

import platform

import accelerate
import peft
import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# Tests run tiny tensors, for which thread start-up costs more than it saves (and on a busy
# 2-core machine multi-threaded small ops are an order of magnitude slower).
torch.set_num_threads(1)


def libraries_of_this_process() -> dict[str, str]:
    """What `library_versions` must record, read from the imported modules rather than package metadata."""
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama with the module names of real ones (q_proj, v_proj, lm_head, ...)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


def make_tiny_tokenizer():
    """A word-level tokenizer (< 128 ids, fits `make_tiny_llama`) over the committed fixture questions.

    Splits on whitespace and punctuation; unknown words map to [UNK]. Built in milliseconds, no download.
    """
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fixture = Path(__file__).resolve().parents[1] / "bayeslora" / "tasks" / "fixtures" / "questions.jsonl"
    text = " ".join(
        " ".join([record["question"], record.get("context", ""), *record["choices"]])
        for record in map(json.loads, fixture.read_text().splitlines())
    )
    pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted({word for word, _ in pre_tokenizer.pre_tokenize_str(text)})
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    base = specials + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + ["Question", "Answer", ":", ".", "?", "___"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(base + words))}
    assert len(vocab) <= 128, len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()
