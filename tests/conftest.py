"""Shared test fixtures: tiny random causal LMs that build in milliseconds on CPU."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Tests run tiny tensors, for which thread start-up costs more than it saves (and on a busy
# 2-core machine multi-threaded small ops are an order of magnitude slower).
torch.set_num_threads(1)


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
