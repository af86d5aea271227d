"""The inducing-weight factor against independent dense references."""

import math

import pytest
import torch
import torch.distributions as td

from bayeslora.inducing import InducingFactor, conditional_kl, inverse_softplus


def _factor(out_features=5, in_features=7, rows=3, cols=3, **settings) -> InducingFactor:
    torch.manual_seed(0)
    factor = InducingFactor(out_features, in_features, rows, cols, **settings)
    with torch.no_grad():  # well-conditioned prior-side values, so that dense references are accurate
        factor.d_row_raw.fill_(inverse_softplus(0.5))
        factor.d_col_raw.fill_(inverse_softplus(0.7))
    return factor


def _dense_prior(factor: InducingFactor):
    """Float64 dense prior quantities from the raw parameters, with explicit inverses (the test's own route).

    Returns (P, Sigma_W): the matrix P with vec(T_r U T_c) = P vec(V) for U = L_r V L_c^T, and the conditional
    covariance Sigma_W = I - (Z_r^T K_r^-1 Z_r) (x) (Z_c^T K_c^-1 Z_c), both in row-major vec.
    """
    z_r, z_c = factor.z_row.detach().double(), factor.z_col.detach().double()
    d_r = torch.nn.functional.softplus(factor.d_row_raw.detach().double())
    d_c = torch.nn.functional.softplus(factor.d_col_raw.detach().double())
    k_r = z_r @ z_r.T + torch.diag(d_r**2)
    k_c = z_c @ z_c.T + torch.diag(d_c**2)
    # the factor adds jitter 1e-5 * mean(diag K) before its Cholesky; the reference does the same
    k_r = k_r + 1e-5 * k_r.diagonal().mean() * torch.eye(len(k_r), dtype=torch.float64)
    k_c = k_c + 1e-5 * k_c.diagonal().mean() * torch.eye(len(k_c), dtype=torch.float64)
    t_r, t_c = z_r.T @ torch.linalg.inv(k_r), torch.linalg.inv(k_c) @ z_c
    l_r, l_c = torch.linalg.cholesky(k_r), torch.linalg.cholesky(k_c)
    projection = torch.kron(t_r @ l_r, t_c.T @ l_c)
    n = factor.out_features * factor.in_features
    return projection, torch.eye(n, dtype=torch.float64) - torch.kron(t_r @ z_r, z_c.T @ t_c)


def _dense_conditional_covariance(factor: InducingFactor) -> torch.Tensor:
    return _dense_prior(factor)[1]


def test_diagonal_kl_matches_torch_distributions():
    factor = _factor(flow=False)
    with torch.no_grad():
        factor.u_sd_raw.copy_(torch.rand_like(factor.u_sd_raw) - 3.0)
    mean, sd = factor.u_mean.detach(), factor.u_sd.detach()
    reference = td.kl_divergence(td.Normal(mean, sd), td.Normal(torch.zeros_like(mean), 1.0)).sum()
    lam = factor.lam.detach()
    conditional = 0.5 * 35 * (lam**2 - 1 - 2 * torch.log(lam))
    assert torch.allclose(factor.kl_divergence().detach(), reference + conditional, rtol=1e-5)


def test_conditional_kl_term_matches_dense_gaussians():
    factor = _factor(max_lambda=1.0, lambda_init=0.4)
    sigma = _dense_conditional_covariance(factor)
    lam = factor.lam.detach().double()
    scale = factor.prior_scale**2
    mean = torch.randn(35, dtype=torch.float64)
    q = td.MultivariateNormal(mean, covariance_matrix=scale * lam**2 * sigma)
    p = td.MultivariateNormal(mean, covariance_matrix=scale * sigma)
    reference = td.kl_divergence(q, p)
    assert torch.allclose(conditional_kl(35, lam), reference, rtol=1e-6)


def test_learned_prior_lambda_is_the_conditional_kl_minimiser():
    # empirical Bayes on the conditional prior's scale: min over lambda_p of KL(N(m, lambda^2 S) || N(m, lambda_p^2 S))
    factor = _factor(flow=False, max_lambda=1.0, lambda_init=0.4, learn_prior_lambda=True)
    sigma = _dense_conditional_covariance(factor) * factor.prior_scale**2
    lam = factor.lam.detach().double()
    mean = torch.zeros(35, dtype=torch.float64)
    q = td.MultivariateNormal(mean, covariance_matrix=lam**2 * sigma)
    grid = torch.linspace(0.2, 0.8, 61, dtype=torch.float64)
    kls = torch.stack([td.kl_divergence(q, td.MultivariateNormal(mean, covariance_matrix=s**2 * sigma)) for s in grid])
    assert abs(grid[kls.argmin()] - lam) < 0.011 and kls.min() < 1e-3
    inducing = td.kl_divergence(td.Normal(factor.u_mean, factor.u_sd), td.Normal(0.0, 1.0)).sum()
    kl = factor.kl_divergence()
    assert torch.allclose(kl.detach(), inducing.detach(), rtol=1e-5)
    kl.backward()
    assert factor.lambda_raw.grad is None or factor.lambda_raw.grad == 0  # only the data term moves lambda
    fixed = _factor(flow=False, max_lambda=1.0, lambda_init=0.4)
    fixed.kl_divergence().backward()
    assert fixed.lambda_raw.grad < 0  # the fixed prior's conditional KL pulls lambda up towards 1


def test_flow_kl_equals_closed_form_when_flow_is_identity():
    with_flow, without_flow = _factor(flow=True), _factor(flow=False)
    with torch.no_grad():
        without_flow.u_mean.copy_(with_flow.u_mean)
    for _ in range(3):
        assert torch.allclose(with_flow.kl_divergence(), without_flow.kl_divergence(), rtol=1e-6)


def test_flow_kl_average_converges_to_monte_carlo_reference():
    factor = _factor(flow=True, max_sd_u=1.0, sd_init=0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in factor.flow.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
        conditional = conditional_kl(35, factor.lam)
        from bayeslora.inducing import kl_terms

        estimate = (kl_terms([factor] * 4000) - conditional).mean()  # 4000 independent one-sample estimates
        # reference: E_q[log q(V) - log p(V)] with log q(V) = log q0(V0) - log|det dT/dV0| (change of variables)
        q0 = td.Normal(factor.u_mean, factor.u_sd)
        v0 = q0.sample((4000,))
        terms = []
        for sample in v0:
            v, log_det = factor.flow(sample)
            terms.append(q0.log_prob(sample).sum() - log_det - td.Normal(0.0, 1.0).log_prob(v).sum())
        reference = torch.stack(terms)
    standard_error = reference.std() / math.sqrt(len(reference))
    assert abs(estimate - reference.mean()) < 5 * standard_error + 1e-3


def _weight_samples(factor: InducingFactor, count: int) -> torch.Tensor:
    """`count` independent posterior draws, made as one batched draw of `count` copies of the factor."""
    from bayeslora.inducing import draw_weights

    with torch.no_grad():
        return draw_weights([factor] * count, "sample").flatten(1).double()


def test_conditional_noise_has_the_conditional_covariance():
    # q0 collapsed to a point (sd 1e-7): all remaining randomness is the Matheron-rule conditional noise
    factor = _factor(flow=False, max_lambda=1.0, lambda_init=0.5, sd_init=1e-7)
    torch.manual_seed(2)
    samples = _weight_samples(factor, 40000)
    projection, sigma = _dense_prior(factor)
    scale, lam = factor.prior_scale, factor.lam.detach().double()
    assert (samples.mean(0) - scale * projection @ factor.u_mean.detach().double().flatten()).abs().max() < 0.02 * scale
    assert (samples.T.cov() - scale**2 * lam**2 * sigma).abs().max() < 0.01 * scale**2


def test_weight_samples_match_analytic_mean_and_covariance():
    factor = _factor(flow=False, max_lambda=1.0, lambda_init=0.5, max_sd_u=1.0, sd_init=0.3)
    torch.manual_seed(3)
    samples = _weight_samples(factor, 40000)
    projection, sigma = _dense_prior(factor)
    scale, lam = factor.prior_scale, factor.lam.detach().double()
    mean = scale * projection @ factor.u_mean.detach().double().flatten()
    sd = factor.u_sd.detach().double().flatten()
    covariance = scale**2 * (projection @ torch.diag(sd**2) @ projection.T + lam**2 * sigma)
    assert (samples.mean(0) - mean).abs().max() < 0.03 * scale
    assert (samples.T.cov() - covariance).abs().max() < 0.04 * scale**2


def test_mean_mode_is_the_noise_free_limit():
    factor = _factor(flow=False)
    factor.reset_sampling("mean")
    projection, _ = _dense_prior(factor)
    expected = (factor.prior_scale * projection @ factor.u_mean.detach().double().flatten()).reshape(5, 7).float()
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert torch.allclose(factor(x), x @ expected.T, atol=1e-6)
        assert torch.equal(factor(x), factor(x))


def test_factor_maths_runs_in_fp32_under_bf16_autocast():
    factor = InducingFactor(64, 8)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = factor.sample_weight()
        out = factor(x)
    assert weight.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_batched_group_equals_factor_by_factor():
    from bayeslora.inducing import draw_weights, kl_terms

    torch.manual_seed(4)
    group = [InducingFactor(6, 4, 3, 3) for _ in range(3)]
    with torch.no_grad():
        for factor in group:  # distinct, non-identity flows
            for parameter in factor.flow.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        means = draw_weights(group, "mean")
        for factor, mean in zip(group, means):
            assert torch.allclose(mean, factor.mean_weight(), atol=1e-6)
        for factor in group:  # identity flows: the KL is deterministic, so batched and single must agree
            for parameter in factor.flow.output_layer.parameters():
                parameter.zero_()
        assert torch.allclose(kl_terms(group), torch.stack([f.kl_divergence() for f in group]), rtol=1e-6)


def test_z_perturbation_has_the_released_codes_uniform_moments():
    """Z + 0.01 * eps * softplus(rho), eps ~ U[0, 1): mean Z + 0.005 s, variance (0.01 s)^2 / 12 per entry."""
    from bayeslora.inducing import Z_PERTURBATION, _perturbed

    z = torch.zeros(2, 200_000)
    rho = torch.tensor([0.0, 3.0])
    scale = torch.nn.functional.softplus(rho)[:, None]
    generator = torch.Generator().manual_seed(0)
    draws = _perturbed(z, rho, generator)
    assert torch.allclose(draws.mean(1, keepdim=True), Z_PERTURBATION * scale / 2, rtol=1e-2)
    assert torch.allclose(draws.var(1, keepdim=True), (Z_PERTURBATION * scale) ** 2 / 12, rtol=2e-2)


def test_z_perturbation_acts_on_draws_only():
    torch.manual_seed(5)
    factor = InducingFactor(6, 4, 3, 3, flow=False)
    mean = factor.mean_weight()
    with torch.no_grad():
        factor.z_row_rho.fill_(50.0)  # a perturbation as large as the locations themselves
    assert torch.equal(factor.mean_weight(), mean)
    draw = factor.sample_weight(torch.Generator().manual_seed(1))
    draw.sum().backward()
    assert factor.z_row_rho.grad.abs().sum() > 0


def test_draw_variance_parts_are_the_dense_traces():
    # without a flow both parts are closed form: sigma_p^2 tr(P diag(S^2) P^T) and sigma_p^2 lambda^2 tr(Sigma_W)
    from bayeslora.inducing import draw_variance_parts

    factor = _factor(flow=False, max_lambda=1.0, lambda_init=0.5, max_sd_u=1.0, sd_init=0.3)
    with torch.no_grad():
        factor.u_sd_raw.uniform_(-2.0, 0.5)
    projection, sigma = _dense_prior(factor)
    scale, lam = factor.prior_scale, factor.lam.detach().double()
    sd = factor.u_sd.detach().double().flatten()
    inducing, conditional = draw_variance_parts([factor])
    assert inducing.item() == pytest.approx((scale**2 * (projection**2 @ sd**2).sum()).item(), rel=1e-4)
    assert conditional.item() == pytest.approx((scale**2 * lam**2 * sigma.trace()).item(), rel=1e-4)


def test_draw_variance_parts_with_a_flow_add_up_to_the_variance_of_weight_draws():
    from bayeslora.inducing import draw_variance_parts

    factor = _factor(flow=True, max_lambda=1.0, lambda_init=0.2, max_sd_u=1.0, sd_init=0.5)
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in factor.flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        factor.z_row_rho.fill_(-30.0)  # no Z perturbation: the parts are defined at the unperturbed locations
        factor.z_col_rho.fill_(-30.0)
    samples = _weight_samples(factor, 40000)
    inducing, conditional = draw_variance_parts([factor], draws=20000, generator=torch.Generator().manual_seed(0))
    total = samples.var(0).sum().item()
    assert (inducing + conditional).item() == pytest.approx(total, rel=0.03)
    with torch.no_grad():
        factor.lambda_raw.fill_(-30.0)  # conditional noise off: every bit of the variance is q(U)'s
    samples = _weight_samples(factor, 40000)
    assert inducing.item() == pytest.approx(samples.var(0).sum().item(), rel=0.03)


def _noise_scaled_factor(**settings) -> InducingFactor:
    factor = _factor(flow=False, max_lambda=1.0, lambda_init=0.6, noise_scales=True, **settings)
    with torch.no_grad():  # scales away from 1, different per row and per column
        factor.noise_row_raw.uniform_(-1.0, 1.5)
        factor.noise_col_raw.uniform_(-1.0, 1.5)
    return factor


def _dense_root(sigma: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(sigma)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def _dense_noise_scales(factor: InducingFactor) -> torch.Tensor:
    return torch.diag(torch.kron(factor.noise_row.detach().double(), factor.noise_col.detach().double()))


@pytest.mark.parametrize("out_features", [5, 2])  # 2: fewer rows than inducing rows, as LoRA's A (8 < 9)
def test_conditional_root_is_the_symmetric_square_root_of_sigma_w(out_features):
    from bayeslora.inducing import _conditional_root, _whitened_projection

    factor = _noise_scaled_factor(out_features=out_features)
    entries = out_features * 7
    _, sigma = _dense_prior(factor)
    with torch.no_grad():
        d_row = torch.nn.functional.softplus(factor.d_row_raw)[None]
        d_col = torch.nn.functional.softplus(factor.d_col_raw)[None]
        _, a_row = _whitened_projection(factor.z_row[None], d_row, factor.z_row[None])
        _, a_col = _whitened_projection(factor.z_col[None], d_col, factor.z_col[None])
        q_row, q_col, shrink = _conditional_root(a_row, a_col)
    # S applied to each basis matrix of W's shape gives the columns of the dense S (row-major vec)
    basis = torch.eye(entries).reshape(entries, out_features, 7)
    root = torch.stack([(x - q_row[0] @ (shrink[0] * (q_row[0].T @ x @ q_col[0])) @ q_col[0].T).flatten()
                        for x in basis], dim=1).double()
    assert torch.allclose(root, root.T, atol=1e-5)
    assert torch.allclose(root, _dense_root(sigma), atol=1e-5)


def test_noise_scale_kl_matches_dense_gaussians():
    from bayeslora.inducing import kl_parts

    factor = _noise_scaled_factor()
    _, sigma = _dense_prior(factor)
    root, scales = _dense_root(sigma), _dense_noise_scales(factor)
    lam, variance = factor.lam.detach().double(), factor.prior_scale**2
    zero = torch.zeros(35, dtype=torch.float64)
    q = td.MultivariateNormal(zero, covariance_matrix=variance * lam**2 * root @ scales**2 @ root)
    p = td.MultivariateNormal(zero, covariance_matrix=variance * sigma)
    assert kl_parts([factor])[1].item() == pytest.approx(td.kl_divergence(q, p).item(), rel=1e-4)
    # a learned conditional prior scale is lambda itself: the prior is then N(0, lambda^2 Sigma_W)
    learned = _noise_scaled_factor(learn_prior_lambda=True)
    p_learned = td.MultivariateNormal(zero, covariance_matrix=variance * lam**2 * sigma)
    assert kl_parts([learned])[1].item() == pytest.approx(td.kl_divergence(q, p_learned).item(), rel=1e-4)
    # all scales 1: the scalar-lambda conditional KL
    with torch.no_grad():
        factor.noise_row_raw.fill_(inverse_softplus(1.0))
        factor.noise_col_raw.fill_(inverse_softplus(1.0))
    assert kl_parts([factor])[1].item() == pytest.approx(conditional_kl(35, factor.lam).item(), rel=1e-5)


@pytest.mark.parametrize("out_features", [5, 2])
def test_noise_scaled_draws_have_their_covariance_and_variance_parts(out_features):
    from bayeslora.inducing import draw_variance_parts

    # q0 collapsed to a point and no Z perturbation: all randomness is the scaled conditional noise
    factor = _noise_scaled_factor(sd_init=1e-7, out_features=out_features)
    with torch.no_grad():
        factor.z_row_rho.fill_(-30.0)
        factor.z_col_rho.fill_(-30.0)
    torch.manual_seed(5)
    samples = _weight_samples(factor, 40000)
    projection, sigma = _dense_prior(factor)
    root, scales = _dense_root(sigma), _dense_noise_scales(factor)
    variance, lam = factor.prior_scale**2, factor.lam.detach().double()
    covariance = variance * lam**2 * root @ scales**2 @ root
    mean = factor.prior_scale * projection @ factor.u_mean.detach().double().flatten()
    assert (samples.mean(0) - mean).abs().max() < 0.03 * factor.prior_scale
    assert (samples.T.cov() - covariance).abs().max() < 0.03 * covariance.diagonal().max()
    _, conditional = draw_variance_parts([factor])
    assert conditional.item() == pytest.approx(covariance.trace().item(), rel=1e-4)


@pytest.mark.parametrize("shape", [(48, 16), (8, 48)])  # (8, 48): LoRA's A, fewer rows than inducing rows
def test_noise_scale_gradients_are_finite_at_the_default_tiny_inducing_noise(shape):
    # with D at its default 1e-3 the eigenvalues of A A^T crowd near 1: the root's gradients must stay finite
    torch.manual_seed(0)
    factor = InducingFactor(*shape, noise_scales=True)
    loss = factor.sample_weight(torch.Generator().manual_seed(0)).square().sum() + factor.kl_divergence()
    loss.backward()
    for name, parameter in factor.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert factor.noise_row_raw.grad.abs().sum() > 0 and factor.noise_col_raw.grad.abs().sum() > 0
