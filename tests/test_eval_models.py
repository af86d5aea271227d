"""load_model: local folders, the cached embedded default, and clear errors."""

import pytest
import torch

from bayeslora.errors import UsageError
from bayeslora.models import DEFAULT_MODEL, load_model
from tests.conftest import make_tiny_llama, make_tiny_tokenizer


def _save_tiny(folder, with_pad_token=True):
    make_tiny_llama().save_pretrained(folder)
    tokenizer = make_tiny_tokenizer()
    if not with_pad_token:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_loads_in_eval_mode_with_left_padding(tmp_path):
    model, tokenizer = load_model(str(_save_tiny(tmp_path / "tiny")))
    assert not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "[PAD]"
    reference = make_tiny_llama()
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_missing_pad_token_falls_back_to_end_of_sequence(tmp_path):
    model, tokenizer = load_model(str(_save_tiny(tmp_path / "tiny", with_pad_token=False)))
    assert tokenizer.pad_token == "[EOS]" and model.config.pad_token_id == tokenizer.eos_token_id


def test_default_name_reads_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESLORA_CACHE", str(tmp_path))
    _save_tiny(tmp_path / DEFAULT_MODEL)
    model, _ = load_model(DEFAULT_MODEL)
    assert model.config.hidden_size == 32  # the cached (tiny) folder, not a fresh conversion


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-folder", "runs/a/b"])
def test_missing_paths_are_a_usage_error(name):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(name)


def test_unreachable_hub_id_is_a_usage_error(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail fast instead of retrying the network
    with pytest.raises(UsageError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
