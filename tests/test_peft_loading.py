"""Plain peft on a Bayesian-LoRA adapter gets the posterior mean, never the base model; local and Hub-id paths."""

import shutil

import huggingface_hub
import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import bayeslora
from bayeslora.presets import FIXTURE_MODEL
from bayeslora.errors import UsageError
from tests.conftest import make_tiny_llama

TOKENS = torch.tensor([[3, 17, 42, 99, 5, 8], [60, 2, 2, 71, 33, 1]])


def _trained_like(model):
    """Move every adapter parameter off its initial value (B = 0 at init would hide a dropped adapter)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _bayesian(base=None):
    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"])
    return _trained_like(bayeslora.get_bayeslora_model(base if base is not None else make_tiny_llama(), config))


def _logits(model, tokens=TOKENS, **sampling):
    with torch.no_grad():
        if not sampling:
            return model(tokens).logits
        with bayeslora.sampling(model, **sampling):
            return model(tokens).logits


def test_plain_peft_loads_the_posterior_mean_not_the_base_model(tmp_path):
    model = _bayesian()
    model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    mean = _logits(model, mode="mean")
    torch.testing.assert_close(_logits(plain), mean)
    assert not torch.allclose(mean, _logits(make_tiny_llama()), atol=1e-3)  # the adapter matters


def test_auto_peft_model_loads_the_posterior_mean(tmp_path):
    base = AutoModelForCausalLM.from_pretrained(FIXTURE_MODEL)  # records the folder as base_model_name_or_path
    model = _bayesian(base)
    model.save_pretrained(tmp_path)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    tokens = TOKENS % base.config.vocab_size
    torch.testing.assert_close(_logits(auto, tokens), _logits(model, tokens, mode="mean"))


def _hub_cache(tmp_path, monkeypatch, adapter_dir, repo_id="someone/bayes-adapter"):
    """Lay `adapter_dir` out as the Hub cache holds a downloaded repository, and go offline."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(adapter_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo_id


def test_hub_id_loads_from_the_cache_in_bayeslora_and_in_plain_peft(tmp_path, monkeypatch):
    model = _bayesian()
    model.save_pretrained(tmp_path / "saved")
    repo_id = _hub_cache(tmp_path, monkeypatch, tmp_path / "saved")
    restored = bayeslora.load_bayeslora_model(make_tiny_llama(), repo_id)
    assert torch.equal(_logits(restored, mode="sample", seed=3), _logits(model, mode="sample", seed=3))
    plain = PeftModel.from_pretrained(make_tiny_llama(), repo_id)
    torch.testing.assert_close(_logits(plain), _logits(model, mode="mean"))


def test_a_hub_id_that_does_not_exist_is_one_clear_error(tmp_path, monkeypatch):
    model = _bayesian()
    model.save_pretrained(tmp_path / "saved")
    _hub_cache(tmp_path, monkeypatch, tmp_path / "saved")
    with pytest.raises(UsageError, match="'nobody/no-such-adapter' is not a local folder.*adapter_config.json"):
        bayeslora.load_bayeslora_model(make_tiny_llama(), "nobody/no-such-adapter")


def test_a_plain_lora_adapter_is_refused_by_load_bayeslora_model(tmp_path):
    plain = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="not a Bayesian-LoRA adapter"):
        bayeslora.load_bayeslora_model(make_tiny_llama(), tmp_path)


def _evaluate_fails(capsys, tmp_path, adapter, *extra) -> str:
    from bayeslora.cli import main

    output = tmp_path / "out"
    argv = ["evaluate", "--model", str(FIXTURE_MODEL), "--adapter", adapter, "--task-file",
            str(FIXTURE_MODEL.parent / "arith_test.jsonl"), "--scoring", "cloze", "--output", str(output),
            "--no-progress", *extra]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bayeslora: error:")]
    assert len(errors) == 1 and not output.exists()
    return errors[0]


def test_evaluate_with_a_hub_id_that_does_not_exist_exits_2(tmp_path, monkeypatch, capsys):
    model = _bayesian()
    model.save_pretrained(tmp_path / "saved")
    _hub_cache(tmp_path, monkeypatch, tmp_path / "saved")
    assert "'nobody/no-such-adapter' is not a local folder" in _evaluate_fails(capsys, tmp_path, "nobody/no-such-adapter")


def test_evaluate_refuses_an_adapter_of_another_peft_type_for_a_method(tmp_path, capsys):
    from peft import IA3Config

    base = AutoModelForCausalLM.from_pretrained(FIXTURE_MODEL)
    get_peft_model(base, IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])).save_pretrained(tmp_path / "ia3")
    message = _evaluate_fails(capsys, tmp_path, str(tmp_path / "ia3"), "--method", "mle")
    assert "is a IA3 adapter; --method applies to LoRA adapters" in message


def test_evaluate_refuses_a_bayesian_adapter_for_another_method(tmp_path, capsys):
    _bayesian(AutoModelForCausalLM.from_pretrained(FIXTURE_MODEL)).save_pretrained(tmp_path / "bayes")
    message = _evaluate_fails(capsys, tmp_path, str(tmp_path / "bayes"), "--method", "mcdropout")
    assert "is a Bayesian-LoRA adapter, not one for --method mcdropout" in message
