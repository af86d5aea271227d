"""The peft integration: the LoRA limit, sampling modes, save / load / export, gradients, parameter counts."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import bayeslora
from bayeslora import BayesLoraConfig, get_bayeslora_model
from tests.conftest import make_tiny_llama

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _bayesian_model(**settings):
    config = BayesLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], bayesian_modules=["q_proj", "lm_head"],
        **settings,
    )
    return get_bayeslora_model(make_tiny_llama(), config)


def _logits(model, **sampling):
    with torch.no_grad(), bayeslora.sampling(model, **sampling):
        return model(TOKENS).logits


def test_mean_mode_equals_plain_peft_lora_with_the_mean_factors():
    model = _bayesian_model()
    plain = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    plain_modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                for part in ("lora_A", "lora_B"):
                    factor = getattr(module, part)["default"]
                    weight = factor.mean_weight() if isinstance(factor, bayeslora.InducingFactor) else factor.weight
                    getattr(plain_modules[name], part)["default"].weight.copy_(weight)
    reference = plain(TOKENS).logits
    assert torch.allclose(_logits(model, mode="mean"), reference, atol=1e-5)
    # and the Bayesian update is not trivially zero: the base model alone differs
    with plain.disable_adapter(), torch.no_grad():
        assert not torch.allclose(plain(TOKENS).logits, reference, atol=1e-5)


def test_sampling_modes():
    model = _bayesian_model(max_lambda=0.5, lambda_init=0.3, sd_init=0.05)
    assert torch.equal(_logits(model, mode="sample", seed=3), _logits(model, mode="sample", seed=3))
    assert not torch.allclose(_logits(model, mode="sample", seed=3), _logits(model, mode="sample", seed=4))
    assert torch.equal(_logits(model, mode="mean"), _logits(model, mode="mean"))
    with torch.no_grad(), bayeslora.sampling(model, "sample", seed=5, hold=True):
        first, second = model(TOKENS).logits, model(TOKENS).logits
    assert torch.equal(first, second)
    with torch.no_grad(), bayeslora.sampling(model, "sample", seed=5):
        first, second = model(TOKENS).logits, model(TOKENS).logits
    assert not torch.allclose(first, second)
    factor = next(bayeslora.bayesian_factors(model))
    assert (factor.mode, factor.generator, factor.hold) == ("sample", None, False), "state restored after the block"
    with pytest.raises(ValueError, match="'median'"):
        with bayeslora.sampling(model, "median"):
            pass


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    model = _bayesian_model(learn_prior_lambda=True, noise_scales=True)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    before = _logits(model, mode="sample", seed=11)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    restored = bayeslora.load_bayeslora_model(make_tiny_llama(), tmp_path)
    assert restored.peft_config["default"].bayesian_modules == ["q_proj", "lm_head"]
    assert all(factor.learn_prior_lambda and factor.noise_scales for factor in bayeslora.bayesian_factors(restored))

    def kl_with_the_same_flow_draw(peft_model):
        torch.manual_seed(0)
        return bayeslora.kl_divergence(peft_model)

    assert torch.allclose(kl_with_the_same_flow_draw(restored), kl_with_the_same_flow_draw(model))
    assert torch.equal(_logits(restored, mode="sample", seed=11), before)
    saved = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded = restored.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def _peft_flags_a_factor_s_vectors() -> bool:
    """Whether this peft's save check warns on a 1-D tensor under lora_A that is not a weight: 0.21.2 does,
    0.22 inspects only `.weight` keys."""
    import peft.utils.save_and_load

    check = getattr(peft.utils.save_and_load, "_validate_lora_adapter_state_dict", None)
    if check is None:
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check({"model.layers.0.self_attn.q_proj.lora_A.default.d_row_raw": torch.zeros(3)})
    return any("have invalid shape" in str(warning.message) for warning in caught)


def test_loading_does_not_repeat_peft_s_sharded_tensor_warning_about_the_factor_s_vectors(tmp_path):
    """peft 0.21.2 takes a 1-D tensor under lora_A for an ungathered ZeRO-3 shard; a factor's scales are 1-D
    by design, so our load path (and our trainer's save) must not pass that warning on to the user."""
    model = _bayesian_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)
    if _peft_flags_a_factor_s_vectors():
        assert any("have invalid shape" in str(warning.message) for warning in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bayeslora.load_bayeslora_model(make_tiny_llama(), tmp_path)
    assert not [warning for warning in caught if "have invalid shape" in str(warning.message)]


def test_export_mean_lora_loads_in_plain_peft(tmp_path):
    model = _bayesian_model()
    bayeslora.export_mean_lora(model, tmp_path)
    plain = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(plain(TOKENS).logits, _logits(model, mode="mean"), atol=1e-5)


def test_every_posterior_parameter_receives_a_gradient():
    model = _bayesian_model()
    with torch.no_grad():  # move the flows off their zero-initialised output layer so all weights matter
        for factor in bayeslora.bayesian_factors(model):
            factor.flow.output_layer.weight.normal_(0, 0.1)
    loss = model(TOKENS).logits.logsumexp(-1).mean() + bayeslora.kl_divergence(model) / 1000
    loss.backward()
    posterior = {
        f"{i}.{n}": p for i, factor in enumerate(bayeslora.bayesian_factors(model)) for n, p in factor.named_parameters()
    }
    assert len(posterior) == 6 * 21 and all(p.requires_grad for p in posterior.values())
    missing = [n for n, p in posterior.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


def test_tiny_llama_trains_on_cpu():
    torch.manual_seed(0)
    model = _bayesian_model()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    nlls = []
    for _ in range(25):
        logits = model(inputs).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1))
        loss = nll + bayeslora.kl_divergence(model) / 1e6
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        nlls.append(nll.item())
    assert sum(nlls[-5:]) / 5 < sum(nlls[:5]) / 5 - 0.2


def _llama2_7b_on_meta():
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_llama2_7b_parameter_count_matches_the_paper():
    settings = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"])
    plain = get_peft_model(_llama2_7b_on_meta(), LoraConfig(**settings))
    assert _trainable(plain) == 4_483_072
    config = BayesLoraConfig(**settings, bayesian_modules=["q_proj", "lm_head"])
    # 66 Bayesian factors x (Z, D, U mean and sd, lambda, the 1,554-parameter flow, 9 + 9 Z perturbation scales)
    assert _trainable(get_bayeslora_model(_llama2_7b_on_meta(), config)) == 4_901_762


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(target_modules=["q_proj"], bayesian_modules=["v_proj"]), "'v_proj'"),
        (dict(target_modules=["q_proj"], inducing_rows=0), "inducing_rows"),
        (dict(target_modules=["q_proj"], inducing_cols=-3), "inducing_cols"),
        (dict(target_modules=["q_proj"], max_lambda=0.0), "max_lambda"),
        (dict(target_modules=["q_proj"], prior_sd=-1.0), "prior_sd"),
        (dict(target_modules=["q_proj"], prior_sd=0.0), "prior_sd"),
        (dict(target_modules=["q_proj"], lambda_init=0.0), "lambda_init"),
        (dict(target_modules=["q_proj"], sd_init=0.0), "sd_init"),
        (dict(target_modules=["q_proj"], max_sd_u=0.0), "max_sd_u"),
        (dict(target_modules=["q_proj"], sd_init=0.5, max_sd_u=0.1), "sd_init=0.5 exceeds max_sd_u=0.1"),
    ],
)
def test_bad_configs_are_refused_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        BayesLoraConfig(**settings)


def test_bad_targets_are_refused_when_wrapping():
    with pytest.raises(ValueError, match="not_a_module"):
        get_bayeslora_model(make_tiny_llama(), BayesLoraConfig(target_modules=["not_a_module"]))
    with pytest.raises(ValueError, match="embed_tokens.*Embedding"):
        get_bayeslora_model(make_tiny_llama(), BayesLoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="'k_proj'"):
        config = BayesLoraConfig(target_modules=r".*\.(q|k)_proj", bayesian_modules=["k_proj", "o_proj"])
        config.target_modules = r".*\.q_proj"
        get_bayeslora_model(make_tiny_llama(), config)


def test_merge_and_unload_bakes_in_the_posterior_mean():
    model = _bayesian_model()
    expected = _logits(model, mode="mean")
    merged = model.merge_and_unload()
    assert not bayeslora.is_bayesian(merged)
    with torch.no_grad():
        assert torch.allclose(merged(TOKENS).logits, expected, atol=1e-4)


def test_paper_constants_are_the_published_ones_and_overridable():
    config = BayesLoraConfig.paper(target_modules=["q_proj"], prior_sd=1.0)
    assert (config.prior_sd, config.lambda_init, config.max_lambda, config.sd_init, config.max_sd_u) == (1.0, 1e-3, 0.03, 1e-3, 0.1)
    from bayeslora.methods import get_method

    method = get_method("bayeslora", constants="paper")
    model = method.prepare(make_tiny_llama(), dict(r=4, lora_alpha=8, target_modules=["q_proj"]))
    factor = next(bayeslora.adapter.bayesian_factors(model))
    assert factor.lam.item() == pytest.approx(1e-3, rel=1e-4) and factor.prior_scale == pytest.approx(0.1 / factor.in_features**0.5)
    with pytest.raises(ValueError, match="constants must be one of default, paper"):
        get_method("bayeslora", constants="published")
