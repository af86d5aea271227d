"""temperature and tfb: post-hoc fits on held-out data; bayeslora: the thin wrapper of the adapter API."""

import pytest
import torch

import bayeslora
from bayeslora.methods import get_method
from bayeslora.methods.blob import gaussian_layers
from bayeslora.methods.temperature import fit_temperature
from bayeslora.methods.tfb import pseudo_label_nll, set_sigma
from tests._methods_support import LORA, choice_logits, draw_logits, fit, toy_batches
from tests.conftest import make_tiny_llama


def test_temperature_recovers_a_known_temperature_with_padded_choices():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 4, generator=generator) * 2
    true_logits[::3, 3] = float("-inf")  # every third question has three choices
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=generator).squeeze(1)
    overconfident = true_logits * 2.5  # a model whose logits are 2.5 times too large
    assert fit_temperature(overconfident, labels) == pytest.approx(2.5, rel=0.04)


def test_temperature_method_fits_on_validation_and_keeps_the_argmax():
    method = get_method("temperature")
    model = fit(method, toy_batches(), steps=40, lr=3e-2)
    validation = toy_batches(3, seed=7)
    method.after_training(model, validation, choice_logits)
    logits = torch.cat([choice_logits(model, b) for b in validation]).detach()
    labels = torch.cat([b["answers"] for b in validation])
    assert method.temperature == pytest.approx(fit_temperature(logits, labels))
    adjusted = method.adjust_logits(logits)
    assert torch.equal(adjusted.argmax(-1), logits.argmax(-1))
    nll = lambda z: float(torch.nn.functional.cross_entropy(z, labels))
    assert nll(adjusted) <= nll(logits) + 1e-6
    assert nll(adjusted) < nll(method.adjust_logits(logits) * 1.1) and nll(adjusted) < nll(adjusted / 1.1)


def test_tfb_trains_as_map_then_finds_the_largest_sigma_within_the_nll_budget(capsys):
    method = get_method("tfb", budget=0.05, search_samples=2, search_steps=8)
    model = fit(method, toy_batches(), steps=30)
    assert all(not p.requires_grad and p.abs().sum() == 0 for l in gaussian_layers(model) for p in l.lora_A_sqrt_sd.values())
    batch = toy_batches(1, seed=1)[0]
    with torch.no_grad():
        before = choice_logits(model, batch)
    validation = toy_batches(3, seed=7)
    capsys.readouterr()
    method.after_training(model, validation, choice_logits)
    assert "tfb sigma search: 100%" in capsys.readouterr().err  # sigma_max, then 8 bisection steps
    with torch.no_grad():  # the SVD re-parameterisation leaves the mean adapter unchanged
        assert torch.allclose(choice_logits(model, batch), before, atol=1e-4)
    assert 0 < method.sigma < method.sigma_max

    # independent re-computation of the search criterion: B' = U diag(d) after the SVD, so d = svdvals(B')
    scales = [(l.lora_A_sqrt_sd[a], torch.linalg.svdvals(l.lora_B[a].weight.detach())) for l in gaussian_layers(model) for a in l.lora_A_sqrt_sd]
    with torch.no_grad():
        deterministic = [torch.softmax(choice_logits(model, b), -1) for b in validation]
    labels = [p.argmax(-1) for p in deterministic]
    base = pseudo_label_nll(deterministic, labels)

    def relative_change(sigma):
        set_sigma(scales, sigma)
        with torch.no_grad():
            probs = [torch.stack([torch.softmax(choice_logits(model, b), -1) for _ in method._held(model)]).mean(0) for b in validation]
        return abs(pseudo_label_nll(probs, labels) - base) / base

    resolution = method.sigma_max / 2**method.search_steps
    assert relative_change(method.sigma) <= 0.05
    assert relative_change(method.sigma + resolution) > 0.05
    set_sigma(scales, method.sigma)
    draws = draw_logits(method, model, batch, n_samples=2)
    assert not torch.allclose(draws[0], draws[1])


@pytest.mark.skipif(not hasattr(bayeslora, "get_bayeslora_model"), reason="the Bayesian-LoRA adapter is not merged yet")
def test_bayeslora_method_wraps_the_adapter_api():
    method = get_method("bayeslora")
    model = method.prepare(make_tiny_llama(), dict(LORA))
    assert bayeslora.is_bayesian(model)
    assert torch.allclose(method.regulariser(model, 50), bayeslora.kl_divergence(model) / 50)
    batch = toy_batches(1)[0]
    draws = draw_logits(method, model, batch, n_samples=2, seed=3)
    with torch.no_grad(), bayeslora.sampling(model, "sample", seed=4, hold=True):
        assert torch.equal(choice_logits(model, batch), draws[1])
