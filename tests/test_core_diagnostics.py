"""Posterior diagnostics against values computed by hand on a tiny model."""

import math
import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer

import bayeslora
from bayeslora import BayesLoraConfig, get_bayeslora_model
from bayeslora.diagnostics import MI_FLOAT_FLOOR, collapse_message, draw_disagreement, posterior_state
from bayeslora.predictive import summarise_draws
from tests.conftest import make_tiny_llama


def _model():
    torch.manual_seed(0)
    config = BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                             flow=False, prior_sd=1.0, lambda_init=0.02, max_lambda=0.1, sd_init=0.05)
    model = get_bayeslora_model(make_tiny_llama(), config)
    with torch.no_grad():  # distinct values per factor, and a non-zero plain LoRA B on v_proj
        for index, factor in enumerate(bayeslora.adapter.bayesian_factors(model)):
            factor.lambda_raw.fill_(math.log(math.expm1(0.01 * (index + 1))))
            factor.u_sd_raw.uniform_(-5.0, -3.0)
        for name, parameter in model.named_parameters():
            if "v_proj.lora_B" in name:
                parameter.normal_()
    return model


def test_scales_and_kl_parts_match_hand_computation():
    model = _model()
    factors = list(bayeslora.adapter.bayesian_factors(model))
    state = posterior_state(model)
    lambdas = [0.01 * (i + 1) for i in range(len(factors))]
    assert state["lambda_mean"] == pytest.approx(sum(lambdas) / len(lambdas), rel=1e-5)
    assert state["lambda_max"] == pytest.approx(max(lambdas), rel=1e-5)
    sds = torch.cat([torch.nn.functional.softplus(f.u_sd_raw).flatten() for f in factors])
    assert state["sd_mean"] == pytest.approx(sds.mean().item(), rel=1e-5)
    assert state["sd_max"] == pytest.approx(sds.max().item(), rel=1e-5)
    conditional = sum(0.5 * f.out_features * f.in_features * (lam**2 - 1 - 2 * math.log(lam))
                      for f, lam in zip(factors, lambdas))
    assert state["kl_conditional"] == pytest.approx(conditional, rel=1e-4)
    inducing = sum(0.5 * (f.u_sd.square() + f.u_mean.square() - 1 - 2 * f.u_sd.log()).sum().item() for f in factors)
    assert state["kl_inducing"] == pytest.approx(inducing, rel=1e-4)
    assert state["kl_inducing"] + state["kl_conditional"] == pytest.approx(bayeslora.kl_divergence(model).item(), rel=1e-5)


def test_relative_update_is_the_dense_norm_ratio_averaged_over_layers():
    model = _model()
    expected = {"q_proj": [], "v_proj": []}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                a, b = module.lora_A["default"], module.lora_B["default"]
                a = a.mean_weight() if isinstance(a, bayeslora.InducingFactor) else a.weight
                b = b.mean_weight() if isinstance(b, bayeslora.InducingFactor) else b.weight
                delta = module.scaling["default"] * b @ a
                expected[name.rsplit(".", 1)[-1]].append((delta.norm() / module.base_layer.weight.norm()).item())
    state = posterior_state(model)
    for target, values in expected.items():
        assert state["relative_update"][target] == pytest.approx(sum(values) / len(values), rel=1e-4)
        assert state["relative_update"][target] > 0


def test_inducing_variance_share_is_the_dense_share_averaged_over_layers():
    # one factor's share by hand: S^2 summed with the squared column norms of P = A_r^T (x) A_c^T, over that plus
    # lambda^2 tr(Sigma_W) = lambda^2 (d_out d_in - ||A_r||^2 ||A_c||^2)
    model = _model()
    expected = {"q_proj.lora_A": [], "q_proj.lora_B": []}
    for name, module in model.named_modules():
        if not isinstance(module, bayeslora.InducingFactor):
            continue
        with torch.no_grad():
            def whitened(z, d_raw):
                k = z.double() @ z.double().T + torch.diag(torch.nn.functional.softplus(d_raw.double()) ** 2)
                k = k + 1e-5 * k.diagonal().mean() * torch.eye(len(k), dtype=torch.float64)
                return torch.linalg.inv(torch.linalg.cholesky(k)) @ z.double()

            a_r, a_c = whitened(module.z_row, module.d_row_raw), whitened(module.z_col, module.d_col_raw)
            inducing = (module.u_sd.double() ** 2 * (a_r**2).sum(1)[:, None] * (a_c**2).sum(1)[None, :]).sum()
            conditional = module.lam.double() ** 2 * (module.out_features * module.in_features
                                                      - (a_r**2).sum() * (a_c**2).sum())
        expected[".".join(name.split(".")[-3:-1])].append((inducing / (inducing + conditional)).item())
    shares = posterior_state(model)["inducing_variance_share"]
    assert set(shares) == set(expected)
    for factor, values in expected.items():
        assert shares[factor] == pytest.approx(sum(values) / len(values), rel=1e-4)
        assert 0 < shares[factor] < 1


def test_collapse_is_reported_only_at_the_float_floor():
    state = posterior_state(_model())
    message = collapse_message(MI_FLOAT_FLOOR / 10, state)
    assert message is not None and "collapsed" in message and "\n" not in message
    assert collapse_message(1e-3, state) is None


def test_no_bayesian_factors_is_an_error():
    with pytest.raises(ValueError, match="no Bayesian factors"):
        posterior_state(make_tiny_llama())


def test_draw_disagreement_splits_mutual_information_by_correctness():
    # question 0: draws (0.9, 0.1) and (0.1, 0.9), gold 1 -> mixture (0.5, 0.5), predicted 0: wrong
    # question 1: both draws (0.8, 0.2), gold 0 -> right, MI 0
    log_probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2]], [[0.1, 0.9], [0.8, 0.2]]]).log()
    summary = draw_disagreement(summarise_draws(log_probs, torch.tensor([1, 0])))
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    mi_wrong = h([0.5, 0.5]) - h([0.9, 0.1])
    assert summary["mutual_information_wrong"] == pytest.approx(mi_wrong, rel=1e-5)
    assert summary["mutual_information_right"] == pytest.approx(0.0, abs=1e-6)
    assert summary["mutual_information"] == pytest.approx(mi_wrong / 2, rel=1e-5)
    assert draw_disagreement(summarise_draws(log_probs[:, 1:], torch.tensor([0])))["mutual_information_wrong"] is None


def test_noise_scale_range_is_lambda_times_the_extreme_row_and_column_scales():
    torch.manual_seed(0)
    config = BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], flow=False, noise_scales=True)
    model = get_bayeslora_model(make_tiny_llama(), config)
    factors = list(bayeslora.adapter.bayesian_factors(model))
    with torch.no_grad():
        for factor in factors:
            factor.lambda_raw.uniform_(-2.0, 0.0)
            factor.noise_row_raw.uniform_(-2.0, 2.0)
            factor.noise_col_raw.uniform_(-2.0, 2.0)

    def softplus(x):
        return math.log1p(math.exp(x))

    def entry_scales(f):  # every entry's scale lambda r_i c_j, by hand
        lam = softplus(f.lambda_raw.item())
        return [lam * softplus(r) * softplus(c) for r in f.noise_row_raw.tolist() for c in f.noise_col_raw.tolist()]

    scales = [s for f in factors for s in entry_scales(f)]
    state = posterior_state(model)
    assert state["noise_scale_min"] == pytest.approx(min(scales), rel=1e-5)
    assert state["noise_scale_max"] == pytest.approx(max(scales), rel=1e-5)
    assert "noise_scale_min" not in posterior_state(_model())  # only where the model has noise scales


def _expected_score_products(model, scorer, questions, points) -> list[torch.Tensor]:
    """Per Bayesian factor, E_{y ~ p}[s_y s_y^T] with s_y = d log p_y / dM (flattened), summed over the
    questions, averaged over the (sampling mode, seed) points."""
    factors = list(bayeslora.adapter.bayesian_factors(model))
    expected = [torch.zeros(f.u_mean.numel(), f.u_mean.numel()) for f in factors]
    for question in questions:
        for mode, seed in points:
            for label in range(len(question.choices)):
                with bayeslora.sampling(model, mode, seed=seed, hold=True):
                    log_probs = scorer.choice_logits(model, scorer.collate([question]))[0].log_softmax(-1)
                with warnings.catch_warnings():  # the reference's gradients are no training either
                    warnings.simplefilter("ignore", bayeslora.kl_guard.MissingKLWarning)
                    scores = torch.autograd.grad(log_probs[label], [f.u_mean for f in factors])
                for total, score in zip(expected, scores):
                    total += log_probs[label].exp().detach() * torch.outer(score.flatten(), score.flatten()) / len(points)
    return expected


@pytest.mark.parametrize("draws", [0, 3])
def test_inducing_data_precision_is_the_expected_squared_score_of_the_answer(draws):
    """Against the Fisher information written as E_{y ~ p}[(d log p_y / dM)^2], per question, summed; at the
    deterministic point, or averaged over posterior draws."""
    from bayeslora.diagnostics import inducing_data_precision
    from bayeslora.scoring import Scorer
    from bayeslora.tasks import load_task_file
    from tests.conftest import make_tiny_tokenizer

    model = _model()
    scorer = Scorer(make_tiny_tokenizer(), "cloze")
    questions = load_task_file("bayeslora/tasks/fixtures/questions.jsonl")[:3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision = inducing_data_precision(model, scorer, questions, draws=draws, seed=5)
    assert not caught  # measuring is not training: no missing-KL warning

    points = [("mean", None)] if draws == 0 else [("sample", 5 + k) for k in range(draws)]
    expected = _expected_score_products(model, scorer, questions, points)
    factors = list(bayeslora.adapter.bayesian_factors(model))
    names = {id(m): n.split(".")[-3] + "." + n.split(".")[-2] for n, m in model.named_modules()
             if isinstance(m, bayeslora.InducingFactor)}
    for name in ("q_proj.lora_A", "q_proj.lora_B"):
        mine = [t.double() for f, t in zip(factors, expected) if names[id(f)] == name]
        traces = [t.trace().item() for t in mine]
        assert precision[name]["trace_mean"] == pytest.approx(sum(traces) / len(traces), rel=1e-4, abs=0)
        assert precision[name]["trace_max"] == pytest.approx(max(traces), rel=1e-4, abs=0)
        assert precision[name]["entry_max"] == pytest.approx(max(t.diagonal().max().item() for t in mine), rel=1e-4, abs=0)
        # the largest eigenvalue: the Rayleigh quotient's maximum, found here by power iteration
        largest = []
        for t in mine:
            vector = torch.ones(t.shape[0], dtype=torch.float64)
            for _ in range(2000):
                vector = t @ vector
                vector /= vector.norm()
            largest.append((vector @ t @ vector).item())
        assert precision[name]["eigen_max"] == pytest.approx(max(largest), rel=1e-4, abs=0)
        assert precision[name]["eigen_max"] < precision[name]["trace_max"]  # F is not rank one here
        sds = torch.cat([torch.nn.functional.softplus(f.u_sd_raw).flatten() for f in factors if names[id(f)] == name])
        assert precision[name]["sd_mean"] == pytest.approx(sds.mean().item(), rel=1e-6)
        assert precision[name]["sd_min"] == pytest.approx(sds.min().item(), rel=1e-6)
    assert min(traces) > 0  # the answers do depend on the factor: the comparison is not of two zeros
    if draws:  # the draws are used: their average is not the deterministic point's value
        at_mean = inducing_data_precision(model, scorer, questions)
        assert precision["q_proj.lora_A"]["trace_mean"] != pytest.approx(at_mean["q_proj.lora_A"]["trace_mean"], rel=1e-3)


def test_inducing_data_precision_refuses_a_negative_number_of_draws():
    from bayeslora.diagnostics import inducing_data_precision

    with pytest.raises(ValueError, match="draws must be a non-negative integer, got -1"):
        inducing_data_precision(_model(), None, [], draws=-1)
