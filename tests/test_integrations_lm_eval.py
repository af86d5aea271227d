"""The lm-evaluation-harness model: posterior-predictive log-likelihoods of hand-built requests (no Hub access)."""

from __future__ import annotations

import pytest
import torch

import bayeslora
from bayeslora.errors import UsageError
from bayeslora.predictive import log_mean_exp
from bayeslora.scoring import Scorer, cloze_continuation, cloze_prompt
from bayeslora.tasks import load_task_file
from tests._integrations_support import FIXTURE, MODEL, fixture_bayeslora_model
from tests._integrations_support import fresh_accelerate_state  # noqa: F401 (an autouse fixture)

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from bayeslora.integrations.lm_eval import BayesLoraLM  # noqa: E402

SAMPLES, SEED = 3, 5


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A saved adapter with a wide posterior, so that draws differ visibly."""
    model = fixture_bayeslora_model(prior_sd=1.0, lambda_init=0.3, max_lambda=0.3, sd_init=0.5, max_sd_u=1.0)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def test_loglikelihood_is_the_log_mean_over_draws_of_the_cloze_sum_probability(adapter):
    lm = get_model("bayeslora").create_from_arg_string(
        f"pretrained={MODEL},adapter={adapter},samples={SAMPLES},seed={SEED}", {"batch_size": 3, "device": "cpu"})
    assert isinstance(lm, BayesLoraLM)
    questions = load_task_file(FIXTURE / "arith_test.jsonl")[:5]
    requests = [Instance("loglikelihood", {}, (cloze_prompt(question), cloze_continuation(choice)), index)
                for question in questions for index, choice in enumerate(question.choices)]
    answers = lm.loglikelihood(requests, disable_tqdm=True)

    scorer = Scorer(lm.tokenizer, "cloze", normalization="sum")
    batch = scorer.collate(questions)
    with torch.no_grad():
        draws = []
        for sample in range(SAMPLES):
            with bayeslora.sampling(lm.model, "sample", seed=SEED + sample, hold=True):
                draws.append(scorer.choice_logits(lm.model, batch))
    draws = torch.stack(draws)  # [S, questions, choices]
    expected = log_mean_exp(draws, dim=0)
    rows = [(q, c) for q, question in enumerate(questions) for c in range(len(question.choices))]
    assert [value for value, _ in answers] == pytest.approx([expected[q, c].item() for q, c in rows], abs=1e-4)
    # the draws differ by more than the tolerance: one draw, or the mean log-likelihood, would fail the check above
    first = torch.tensor([draws[0, q, c] for q, c in rows])
    assert (first - torch.tensor([value for value, _ in answers])).abs().max() > 1e-2
    assert all(isinstance(greedy, bool) for _, greedy in answers)


def test_greedy_flag_follows_the_draw_averaged_next_token_distribution(adapter):
    lm = BayesLoraLM(pretrained=str(MODEL), adapter=str(adapter), samples=SAMPLES, seed=SEED)
    context = "Question: What is 2 plus 2?\nAnswer:"
    ids = torch.tensor([lm.tokenizer(context)["input_ids"]])
    with torch.no_grad():
        probs = 0
        for sample in range(SAMPLES):
            with bayeslora.sampling(lm.model, "sample", seed=SEED + sample, hold=True):
                probs = probs + lm.model(ids).logits[0, -1].softmax(-1)
    top, other = probs.argsort(descending=True)[:2].tolist()
    for token in (top, other):  # each continuation is exactly that one token
        assert lm.tokenizer(lm.tokenizer.decode([token]), add_special_tokens=False)["input_ids"] == [token]
    (_, top_greedy), (_, other_greedy) = lm.loglikelihood(
        [Instance("loglikelihood", {}, (context, lm.tokenizer.decode([token])), 0) for token in (top, other)],
        disable_tqdm=True)
    assert top_greedy and not other_greedy


def test_bad_arguments_and_unsupported_requests_are_refused(adapter):
    with pytest.raises(UsageError, match="samples must be a positive integer"):
        BayesLoraLM(pretrained=str(MODEL), adapter=str(adapter), samples=0)
    with pytest.raises(UsageError, match="batch_size must be a positive integer"):
        BayesLoraLM(pretrained=str(MODEL), adapter=str(adapter), batch_size="auto")
    with pytest.raises(UsageError, match="unknown dtype 'float32'; valid: fp32, bf16, fp16"):
        BayesLoraLM(pretrained=str(MODEL), adapter=str(adapter), dtype="float32")
    lm = BayesLoraLM(pretrained=str(MODEL), adapter=str(adapter))
    with pytest.raises(NotImplementedError, match="loglikelihood requests"):
        lm.generate_until([])
