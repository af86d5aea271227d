"""laplace / laplace_last: the KFAC GGN against a dense GGN, posterior sampling moments, the fit."""

import pytest
import torch

from bayeslora.methods import get_method
from bayeslora.methods.laplace import KroneckerPosterior, LowRankCurvature, kfac_factors, lora_weight_modules
from tests._methods_support import CHOICE_TOKENS, LORA, choice_logits, draw_logits, fit, toy_batches
from tests.conftest import make_tiny_llama


def _dense_ggn(model, weight, batch):
    """J^T (diag p - p p^T) J for the per-choice logits of one question, J = d logits / d vec(weight) (row-major)."""
    name = next(n for n, p in model.named_parameters() if p is weight)

    def logits_at(w):
        output = torch.func.functional_call(model, {name: w}, args=(), kwargs={"input_ids": batch["input_ids"]})
        return output.logits[0, -1, CHOICE_TOKENS].double()

    jacobian = torch.autograd.functional.jacobian(logits_at, weight.detach().clone()).reshape(len(CHOICE_TOKENS), -1).double()
    with torch.no_grad():
        probs = torch.softmax(logits_at(weight), -1)
    return jacobian.T @ (torch.diag(probs) - torch.outer(probs, probs)) @ jacobian


def test_kfac_equals_the_dense_ggn_when_each_matrix_sees_one_token_row():
    model = get_method("laplace").prepare(make_tiny_llama(0), dict(LORA)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # B = 0 at init would leave A without gradient
    batch = {"input_ids": torch.tensor([[17]]), "answers": torch.tensor([2])}
    modules = lora_weight_modules(model)
    factors = kfac_factors(model, modules, [batch], choice_logits)
    nonzero = 0
    for name, module in modules.items():
        a, g = factors[name]
        dense = _dense_ggn(model, module.weight, batch).double()
        kfac = torch.kron(g, a)  # row-major vec(W): the quadratic form sum_c (g_c^T dW a)^2
        assert torch.allclose(kfac, dense, rtol=1e-4, atol=1e-6 * float(dense.abs().max() + 1)), name
        nonzero += bool(dense.abs().max() > 1e-6)
    assert nonzero == 4  # v_proj's A and B in both layers carry curvature (q_proj cannot, with a single key)


def test_kronecker_posterior_samples_have_the_inverse_precision_as_covariance():
    torch.manual_seed(0)
    a_root, g_root = torch.randn(3, 3), torch.randn(2, 2)
    a, g, tau = a_root @ a_root.T, g_root @ g_root.T, 0.5
    posterior = KroneckerPosterior.from_factors("w", torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)), a, g)
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([posterior.sample(tau, generator).flatten() for _ in range(40000)])
    covariance = torch.linalg.inv(torch.kron(g, a).double() + tau * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(samples.T @ samples / len(samples), covariance, atol=0.03 * float(covariance.diag().max()))


def test_low_rank_curvature_is_the_exact_sum_while_its_rank_suffices_and_the_leading_part_beyond():
    torch.manual_seed(0)
    rows = torch.randn(7, 12, dtype=torch.float64)
    curvature = LowRankCurvature.empty(12, rank=7)
    for chunk in (rows[:3], torch.zeros(2, 12, dtype=torch.float64), rows[3:]):  # zero rows carry nothing
        curvature.add(chunk)
    assert torch.allclose(curvature.basis @ torch.diag(curvature.eig) @ curvature.basis.T, rows.T @ rows)
    assert torch.allclose(curvature.basis.T @ curvature.basis, torch.eye(7, dtype=torch.float64))
    # rows from a 2-dimensional subspace, rank 2: still exact, whatever the number of rows
    low = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 12, dtype=torch.float64)
    truncated = LowRankCurvature.empty(12, rank=2)
    for chunk in low.split(4):
        truncated.add(chunk)
    assert torch.allclose(truncated.basis @ torch.diag(truncated.eig) @ truncated.basis.T, low.T @ low)
    assert torch.allclose((truncated * 3.0).eig, 3.0 * truncated.eig)


def test_a_factor_above_the_dense_limit_is_kept_low_rank_and_equals_the_dense_one_at_full_rank():
    model = get_method("laplace").prepare(make_tiny_llama(0), dict(LORA)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    modules = lora_weight_modules(model)
    batches = toy_batches()[:2]
    dense = kfac_factors(model, modules, batches, choice_logits)
    widest = max(m.out_features for m in modules.values())
    low_rank = kfac_factors(model, modules, batches, choice_logits, max_dense_factor=4, factor_rank=widest)
    assert any(isinstance(g, LowRankCurvature) for _, g in low_rank.values())
    for name, (a, g) in low_rank.items():
        assert torch.equal(a, dense[name][0])
        if isinstance(g, LowRankCurvature):
            assert modules[name].out_features > 4
            g = g.basis @ torch.diag(g.eig) @ g.basis.T
        assert torch.allclose(g, dense[name][1], atol=1e-9 * float(dense[name][1].abs().max() + 1)), name


def test_a_low_rank_output_factor_samples_the_prior_in_its_complement():
    """Covariance of draws with G = u u^T given as a rank-1 `LowRankCurvature` in 3 rows: (G (x) A + tau I)^-1."""
    torch.manual_seed(0)
    a_root, u = torch.randn(2, 2, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    a, tau = a_root @ a_root.T, 0.5
    curvature = LowRankCurvature.empty(3, rank=1)
    curvature.add(u)
    posterior = KroneckerPosterior.from_factors("w", torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64)), a,
                                                curvature)
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([posterior.sample(tau, generator).flatten() for _ in range(40000)])
    covariance = torch.linalg.inv(torch.kron(u.T @ u, a) + tau * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(samples.T @ samples / len(samples), covariance, atol=0.03 * float(covariance.diag().max()))


@pytest.mark.parametrize("option", ["max_dense_factor", "factor_rank"])
def test_factor_size_options_must_be_positive_integers(option):
    with pytest.raises(ValueError, match=f"{option} must be a positive integer, got 0"):
        get_method("laplace", **{option: 0})


def test_fit_tunes_the_prior_on_validation_and_draws_are_held_seeded_samples(capsys):
    method = get_method("laplace", prior_grid=(1e-2, 1.0, 1e2, 1e4), tune_samples=2)
    batches = toy_batches()
    model = fit(method, batches, steps=30)
    with pytest.raises(ValueError, match="training batches"):
        method.after_training(model, toy_batches(2, seed=3), choice_logits)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    capsys.readouterr()
    method.after_training(model, toy_batches(2, seed=3), choice_logits, train_batches=batches)
    progress = capsys.readouterr().err  # both slow steps show a progress bar
    assert "laplace curvature: 100%" in progress and f"{len(batches)}/{len(batches)}" in progress
    assert "laplace prior search: 100%" in progress and "4/4" in progress
    assert method.prior_precision in (1e-2, 1.0, 1e2, 1e4)
    assert len(method.posteriors) == 8  # A and B of q_proj, v_proj in 2 layers
    nll = {tau: method._validation_nll(model, toy_batches(2, seed=3), choice_logits, tau) for tau in method.prior_grid}
    assert nll[method.prior_precision] == min(nll.values())
    batch = toy_batches(1, seed=1)[0]
    draws = draw_logits(method, model, batch, n_samples=2, seed=4)
    assert not torch.allclose(draws[0], draws[1])
    assert all(torch.equal(x, y) for x, y in zip(draws, draw_logits(method, model, batch, n_samples=2, seed=4)))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_last_layer_variant_covers_only_the_last_adapted_block():
    model = get_method("laplace_last").prepare(make_tiny_llama(0), dict(LORA))
    names = list(lora_weight_modules(model, last_block_only=True))
    assert len(names) == 4 and all(".layers.1." in name for name in names)
    assert len(lora_weight_modules(model)) == 8
