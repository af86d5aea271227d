"""Predictive averaging over draws: log-mean-exp mixture, entropy, expected entropy, mutual information."""

import contextlib
import math

import pytest
import torch

import bayeslora
from bayeslora.methods import get_method
from bayeslora.methods.base import Method
from bayeslora.predictive import log_mean_exp, predict, summarise_draws
from bayeslora.scoring import Scorer
from bayeslora.tasks import load_task_file
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

FIXTURE = "bayeslora/tasks/fixtures/questions.jsonl"


def test_log_mean_exp_is_stable_where_the_naive_formula_overflows():
    values = torch.tensor([[1000.0, -1000.0], [1000.0, float("-inf")]])
    assert torch.allclose(log_mean_exp(values, dim=0), torch.tensor([1000.0, -1000.0 - math.log(2)]))
    assert torch.isinf(torch.exp(values).mean(0).log()[0])  # what log-mean-exp avoids


def test_hand_computed_two_draw_mixture():
    # one question, two draws: p1 = (1, 0), p2 = (0.5, 0.5) -> mixture (0.75, 0.25)
    log_probs = torch.tensor([[[0.0, float("-inf")]], [[math.log(0.5), math.log(0.5)]]])
    result = summarise_draws(log_probs, torch.tensor([0]))
    assert torch.allclose(result.probs, torch.tensor([[0.75, 0.25]]))
    total = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (0.0 + math.log(2)) / 2
    assert result.entropy.item() == pytest.approx(total)
    assert result.expected_entropy.item() == pytest.approx(expected)
    assert result.mutual_information.item() == pytest.approx(total - expected)
    assert result.n_samples == 2


def test_draw_spread_is_the_standard_deviation_over_draws_of_real_choices():
    # one question, choices a, b and a padded c; draws give log p = (-1, -2) and (-3, -0.5)
    pad = float("-inf")
    log_probs = torch.tensor([[[-1.0, -2.0, pad]], [[-3.0, -0.5, pad]]])
    spread = summarise_draws(log_probs, torch.tensor([0])).draw_spread
    assert spread.item() == pytest.approx((1.0 + 0.75) / 2)  # population sd of (-1, -3) is 1, of (-2, -0.5) 0.75
    assert summarise_draws(log_probs[:1], torch.tensor([0])).draw_spread.item() == 0.0


class ScaledDraws(Method):
    """A toy stochastic method: draw s multiplies the model's logits by (s + 1); temperature 2 afterwards."""

    name = "scaled-draws-test"
    default_samples = 3

    def draws(self, model, n_samples=None, seed=0):
        for draw in range(self.sample_count(n_samples)):
            yield _scale_lm_head(model, draw + 1.0)

    def adjust_logits(self, logits):
        return logits / 2


@contextlib.contextmanager
def _scale_lm_head(model, factor):
    original = model.lm_head.weight.data.clone()
    model.lm_head.weight.data *= factor
    try:
        yield
    finally:
        model.lm_head.weight.data = original


def test_predict_averages_softmaxes_of_every_draw_across_batches():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    questions = load_task_file(FIXTURE)
    scorer = Scorer(tokenizer, "letter")
    result = predict(model, scorer, questions, ScaledDraws(), n_samples=3, seed=0, batch_size=3)
    with torch.no_grad():
        per_draw = []
        for factor in (1.0, 2.0, 3.0):
            with _scale_lm_head(model, factor):
                per_draw.append((scorer.choice_logits(model, scorer.collate(questions)) / 2).softmax(-1))
    reference = torch.stack(per_draw).mean(0)
    torch.testing.assert_close(result.probs, reference, atol=1e-6, rtol=1e-5)
    assert torch.allclose(result.probs.sum(-1), torch.ones(len(questions)))
    assert (result.mutual_information > 0).all() and result.n_samples == 3
    assert result.answers.tolist() == [question.answer for question in questions]


def test_the_method_decides_the_number_of_draws_and_predict_counts_them():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    questions, scorer = load_task_file(FIXTURE)[:4], Scorer(tokenizer, "letter")
    assert predict(model, scorer, questions, ScaledDraws()).n_samples == 3  # None: the method's default
    assert predict(model, scorer, questions, ScaledDraws(), n_samples=2).n_samples == 2
    # an ensemble's members are its draws, whatever is asked
    ensemble = get_method("ensemble", members=2)
    peft_model = ensemble.prepare(make_tiny_llama(), {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj"]})
    assert predict(peft_model, scorer, questions, ensemble, n_samples=5).n_samples == 2


def test_deterministic_model_uses_one_draw_with_zero_mutual_information():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    result = predict(model, Scorer(tokenizer, "cloze"), load_task_file(FIXTURE), n_samples=5)
    assert result.n_samples == 1
    assert torch.allclose(result.mutual_information, torch.zeros(8))
    assert torch.allclose(result.entropy, result.expected_entropy)


def _bayesian_tiny_llama():
    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                       bayesian_modules=["q_proj", "lm_head"], prior_sd=5.0, sd_init=0.1, flow=False)
    return bayeslora.get_bayeslora_model(make_tiny_llama(), config)


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_bayesian_draws_hold_one_seeded_posterior_sample_per_draw(mode):
    """Each draw is one held, seeded posterior sample: reproducible, and covering both cloze forward passes."""
    tokenizer, model = make_tiny_tokenizer(), _bayesian_tiny_llama()
    questions = load_task_file(FIXTURE)[:4]
    scorer = Scorer(tokenizer, mode)
    result = predict(model, scorer, questions, get_method("bayeslora"), n_samples=2, seed=11, batch_size=2)
    again = predict(model, scorer, questions, get_method("bayeslora"), n_samples=2, seed=11, batch_size=2)
    torch.testing.assert_close(result.probs, again.probs, atol=0, rtol=0)
    per_draw = []
    with torch.no_grad():
        for seed in (11, 12):
            with bayeslora.sampling(model, "sample", seed=seed, hold=True):
                per_draw.append(scorer.choice_logits(model, scorer.collate(questions)).softmax(-1))
    assert not torch.allclose(per_draw[0], per_draw[1])  # the draws differ
    torch.testing.assert_close(result.probs, torch.stack(per_draw).mean(0), atol=1e-6, rtol=1e-5)
