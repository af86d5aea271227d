"""The predictive distribution over answer choices, averaged over a method's draws.

For draws s = 1..S (posterior samples, dropout masks, ensemble members; one
for deterministic methods) with per-choice logits z_s:

    log p_s    = log_softmax(adjust_logits(z_s))
    log p̄      = log (1/S) sum_s exp(log p_s)      (log-mean-exp, computed stably)
    entropy    H[p̄]            = -sum_c p̄_c log p̄_c
    expected   E_s H[p_s]      = -(1/S) sum_s sum_c p_sc log p_sc
    mutual information  MI     = H[p̄] - E_s H[p_s]   (>= 0; the epistemic part)
    draw spread         sd_s(log p_sc), averaged over the question's choices
                        (how far the draws' choice log-probabilities disagree)

All in nats. Each draw is one context from `method.draws(model, n_samples, seed)`
(the method decides how many: `n_samples` None means its default, and an
ensemble has one per member); S is the number of contexts received. Every
question is scored inside each, so all choices of a question (and every
forward pass that scores them) see the same draw. The model is put in eval
mode first (dropout off); a method that wants dropout switches it on inside
its own draws.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from bayeslora.errors import check_count
from bayeslora.scoring import Scorer
from bayeslora.tasks import Question


class PredictiveMethod(Protocol):
    """What the predictive needs of a method (`bayeslora.methods.Method` has it); the protocol knows no method."""

    def draws(self, model: nn.Module, n_samples: int | None, seed: int) -> Iterator[ContextManager]: ...

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Predictions:
    """Per question: predictive probabilities [N, C_max] (0 on padded choices) and uncertainties [N], in nats."""

    probs: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    draw_spread: torch.Tensor
    answers: torch.Tensor
    n_samples: int


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log((1/S) sum_s exp(values_s)) along `dim`, without overflow; -inf stays -inf."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c log p_c over the last dimension, in nats; choices with p = 0 contribute 0."""
    return -torch.special.xlogy(log_probs.exp(), log_probs.exp()).sum(-1)


def summarise_draws(log_probs: torch.Tensor, answers: torch.Tensor) -> Predictions:
    """`log_probs` [S, N, C] of S draws -> the predictive mixture and its uncertainty decomposition."""
    mixture = log_mean_exp(log_probs, dim=0)
    total = entropy(mixture)
    expected = entropy(log_probs).mean(0)
    return Predictions(
        probs=mixture.exp(),
        entropy=total,
        expected_entropy=expected,
        # clamp: equal in exact arithmetic for a single draw; rounding must not make MI negative
        mutual_information=(total - expected).clamp(min=0),
        draw_spread=_draw_spread(log_probs),
        answers=answers,
        n_samples=log_probs.shape[0],
    )


def _draw_spread(log_probs: torch.Tensor) -> torch.Tensor:
    """[S, N, C] -> [N]: standard deviation over draws of each choice's log-probability, mean over the
    choices that are finite in every draw (padding is -inf everywhere)."""
    real = torch.isfinite(log_probs).all(0)
    if log_probs.shape[0] == 1:
        return torch.zeros(log_probs.shape[1])
    spread = log_probs.masked_fill(~real, 0.0).std(dim=0, correction=0)
    return (spread * real).sum(-1) / real.sum(-1)


def _text_length(question: Question) -> int:
    return len(question.context) + len(question.question) + sum(len(choice) for choice in question.choices)


def _pad_choices(logits: torch.Tensor, width: int) -> torch.Tensor:
    return nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))


def predict(
    model: nn.Module,
    scorer: Scorer,
    questions: Sequence[Question],
    method: PredictiveMethod | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> Predictions:
    """The predictive distribution of `model` on `questions`, averaged over `method`'s draws.

    `n_samples` is passed to the method (None: its default). Without a method the model is
    deterministic: one draw, no logit adjustment.
    """
    check_count("the number of samples", n_samples)
    check_count("batch size", batch_size)
    # batches of similar length waste less compute on padding; results go back to the input order
    order = sorted(range(len(questions)), key=lambda index: _text_length(questions[index]))
    ordered = [questions[index] for index in order]
    batches = [scorer.collate(ordered[start : start + batch_size]) for start in range(0, len(ordered), batch_size)]
    width = max(int(batch["choice_mask"].shape[1]) for batch in batches)
    answers = torch.tensor([question.answer for question in questions], dtype=torch.long)
    draws = list(method.draws(model, n_samples, seed)) if method is not None else [contextlib.nullcontext()]
    adjust = method.adjust_logits if method is not None else (lambda logits: logits)

    model.eval()
    per_draw = []
    with torch.no_grad(), tqdm(total=len(draws) * len(batches), desc="scoring", unit="batch", disable=not progress) as bar:
        for draw in draws:
            with draw:
                logits = []
                for batch in batches:
                    logits.append(_pad_choices(scorer.choice_logits(model, batch), width).cpu())
                    bar.update()
            per_draw.append(adjust(torch.cat(logits)).float().log_softmax(-1))
    original_order = torch.argsort(torch.tensor(order))
    return summarise_draws(torch.stack(per_draw)[:, original_order], answers)
