"""blob: the Gaussian-A peft layer, its KL, Flipout and held-draw moments, the KL re-weighting."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.distributions import Normal, kl_divergence

from bayeslora.methods import get_method
from bayeslora.methods.blob import GaussianALinear, gaussian_kl, gaussian_layers, held_draw, kl_reweighting
from tests._methods_support import LORA, choice_logits, draw_logits, fit, toy_batches
from tests.conftest import make_tiny_llama


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, sd = torch.randn(4, 7), torch.rand(4, 7) * 0.3 + 0.01
    expected = kl_divergence(Normal(mean.double(), sd.double()), Normal(0.0, 0.2)).sum()
    assert torch.allclose(gaussian_kl(mean, sd, 0.2), expected)


def test_method_kl_sums_the_factors_of_every_layer():
    method = get_method("blob", prior_sd=0.3)
    model = method.prepare(make_tiny_llama(), dict(LORA))
    layers = gaussian_layers(model)
    assert len(layers) == 4 and all(isinstance(layer, GaussianALinear) for layer in layers)
    expected = sum(
        kl_divergence(Normal(l.lora_A["default"].weight.double(), l.a_sd("default").double()), Normal(0.0, 0.3)).sum()
        for l in layers
    )
    assert torch.allclose(method.kl_divergence(model).double(), expected, rtol=1e-6)
    sd = torch.cat([l.a_sd("default").flatten() for l in layers])  # BLoB's init: G ~ U(eps/sqrt2, eps), sd = G^2
    assert sd.min() >= 0.05**2 / 2 and sd.max() <= 0.05**2


def test_kl_reweighting_is_blundells_schedule():
    m = 5
    weights = [kl_reweighting(i, m) for i in range(1, m + 1)]
    assert weights == [2**i / (2 ** (m + 1) - 1) for i in range(1, m + 1)]
    assert math.isclose(sum(kl_reweighting(i, 400) for i in range(1, 401)), 1.0)
    method = get_method("blob", batch_size=4)
    model = method.prepare(make_tiny_llama(), dict(LORA))
    kl = method.kl_divergence(model)
    seen = [float(method.regulariser(model, n_train=10).detach() / kl.detach()) for _ in range(4)]  # M = ceil(10 / 4) = 3
    assert seen == pytest.approx([2 / 15, 4 / 15, 8 / 15, 2 / 15], rel=1e-5)


def _single_layer(in_features=6, out_features=5, r=3, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
    config._register_custom_module({torch.nn.Linear: GaussianALinear})
    model = get_peft_model(base, config)
    layer = gaussian_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_A_sqrt_sd["default"].uniform_(0.3, 0.6)
    return model, layer


def test_flipout_output_noise_has_the_mean_field_variance():
    model, layer = _single_layer()
    model.train()
    x = torch.randn(1, 6)
    with torch.no_grad():
        model.eval()
        mean_out = model(x)
        model.train()
        outputs = torch.stack([model(x.expand(25, 6)) for _ in range(4000)]).reshape(-1, 5)
    sd, b, scaling = layer.a_sd("default"), layer.lora_B["default"].weight, layer.scaling["default"]
    # marginal over the noise E_ki ~ N(0, sd_ki^2) and the signs: Var[(B E x)_j] = sum_k B_jk^2 sum_i sd_ki^2 x_i^2
    expected_var = scaling**2 * (b**2) @ ((sd**2) @ (x[0] ** 2))
    assert torch.allclose(outputs.mean(0), mean_out[0], atol=4 * float(expected_var.max().sqrt()) / 100)
    assert torch.allclose(outputs.var(0), expected_var, rtol=0.06)
    # per-example noise: rows of one batch differ, the mean part does not
    assert outputs[:2].std(0).min() > 0


def test_held_draw_is_one_seeded_gaussian_weight_shared_by_every_forward():
    model, layer = _single_layer()
    model.eval()
    x = torch.randn(3, 6)
    noises = []
    for seed in range(3000):
        with held_draw(model, seed):
            noises.append(layer.held_noise["default"])
    noises = torch.stack(noises)
    sd = layer.a_sd("default").detach()
    assert torch.allclose(noises.mean(0), torch.zeros_like(sd), atol=4 * float(sd.max()) / math.sqrt(3000))
    assert torch.allclose(noises.std(0), sd, rtol=0.08)
    with torch.no_grad(), held_draw(model, 7):
        first, second = model(x), model(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        reference = x @ layer.base_layer.weight.T + x @ (a + layer.held_noise["default"]).T @ b.T * layer.scaling["default"]
    assert torch.equal(first, second)
    assert torch.allclose(first, reference, atol=1e-5)
    assert layer.held_noise is None


def test_eval_outside_draws_is_the_mean_lora_and_training_lowers_the_elbo_terms():
    method = get_method("blob", batch_size=8)
    batches = toy_batches()
    model = fit(method, batches, steps=30)
    batch = toy_batches(1, seed=1)[0]
    state = {k.replace("lora_A_sqrt_sd", "unused"): v for k, v in model.state_dict().items()}
    plain = get_peft_model(make_tiny_llama(0), LoraConfig(task_type="CAUSAL_LM", **LORA)).eval()
    plain.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert torch.allclose(choice_logits(model, batch), choice_logits(plain, batch), atol=1e-5)
    draws = draw_logits(method, model, batch, n_samples=3, seed=0)
    assert not torch.allclose(draws[0], draws[1])
    assert all(torch.equal(a, b) for a, b in zip(draws, draw_logits(method, model, batch, n_samples=3, seed=0)))
