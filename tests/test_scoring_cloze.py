"""Cloze scoring: shared-prompt scores equal hand-computed and naive full-sequence log-likelihoods."""

import pytest
import torch

from bayeslora.scoring import Scorer, cloze_continuation, cloze_prompt
from bayeslora.tasks import load_task_file
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

FIXTURE = "bayeslora/tasks/fixtures/questions.jsonl"


def hand_log_likelihood(model, tokenizer, question, choice):
    """log p(choice tokens | prompt tokens), summed, from one unpadded forward pass; and the token count."""
    prompt = tokenizer(cloze_prompt(question)).input_ids
    continuation = tokenizer(cloze_continuation(choice), add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + continuation])
    log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(continuation)), len(continuation)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_scores_equal_hand_computed_log_likelihoods(normalization):
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    questions = load_task_file(FIXTURE)
    scorer = Scorer(tokenizer, "cloze", normalization=normalization)
    with torch.no_grad():
        logits = scorer.choice_logits(model, scorer.collate(questions))
        for row, question in enumerate(questions):
            for column, choice in enumerate(question.choices):
                total, n_tokens = hand_log_likelihood(model, tokenizer, question, choice)
                expected = total if normalization == "sum" else total / n_tokens
                assert logits[row, column].item() == pytest.approx(expected, abs=1e-4)
            assert torch.isneginf(logits[row, len(question.choices) :]).all()


def test_shared_prompt_equals_naive_batching():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama(seed=3)
    questions = load_task_file(FIXTURE)
    scorer = Scorer(tokenizer, "cloze")
    batch = scorer.collate(questions)
    with torch.no_grad():
        shared, naive = scorer.choice_logits(model, batch), scorer.naive_cloze_logits(model, batch)
    finite = batch["choice_mask"]
    assert torch.equal(torch.isneginf(shared), ~finite) and torch.equal(torch.isneginf(naive), ~finite)
    assert (shared[finite] - naive[finite]).abs().max() <= 1e-4


def test_cloze_logits_are_differentiable():
    tokenizer, model = make_tiny_tokenizer(), make_tiny_llama()
    questions = load_task_file(FIXTURE)[:3]
    scorer = Scorer(tokenizer, "cloze")
    batch = scorer.collate(questions)
    torch.nn.functional.cross_entropy(scorer.choice_logits(model, batch), batch["answers"]).backward()
    # the prompt pass matters too: the gradient reaches through the shared key/value cache
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_a_held_posterior_draw_covers_the_prompt_and_the_continuation_passes():
    """Inside one held draw, the two-pass cloze scores equal one-pass hand computations under the same draw."""
    import bayeslora

    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], prior_sd=5.0, sd_init=0.1)
    tokenizer, model = make_tiny_tokenizer(), bayeslora.get_bayeslora_model(make_tiny_llama(), config)
    question = load_task_file(FIXTURE)[1]
    scorer = Scorer(tokenizer, "cloze", normalization="sum")
    with torch.no_grad(), bayeslora.sampling(model, "sample", seed=5, hold=True):
        logits = scorer.choice_logits(model, scorer.collate([question]))[0]
        expected = [hand_log_likelihood(model, tokenizer, question, choice)[0] for choice in question.choices]
        with bayeslora.sampling(model, "sample", seed=6, hold=True):  # another draw scores differently
            other = scorer.choice_logits(model, scorer.collate([question]))[0]
    assert logits.tolist() == pytest.approx(expected, abs=1e-4)
    assert (logits - other).abs().max() > 1e-2
