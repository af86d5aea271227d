"""Calibration metrics on pooled predictive probabilities.

Every function takes `probs` [N, C] (rows sum to 1; padded choices carry 0)
and `labels` [N] (gold indices), and returns a Python float. Notation:
p_i = probs[i], y_i = labels[i], conf_i = max_c p_ic (top-label confidence),
pred_i = argmax_c p_ic (first index on ties).

ECE and MCE use 15 equal-width confidence bins B_1..B_15:
B_m = [(m-1)/15, m/15) for m < 15 and the last bin B_15 = [14/15, 1] includes 1.0.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc

N_BINS = 15


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """(1/N) sum_i [pred_i = y_i]. A fraction in [0, 1] (tables show it as percent)."""
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """-(1/N) sum_i log p_i[y_i], in nats per question. Infinite if a gold choice has probability 0."""
    gold = probs.double().gather(1, labels[:, None]).squeeze(1)
    return (-gold.log()).mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """(1/N) sum_i sum_c (p_ic - [c = y_i])^2, the multi-class Brier score; unitless, in [0, 2].

    Summed over choices (Brier 1950), not averaged over them.
    """
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return ((probs.double() - one_hot) ** 2).sum(-1).mean().item()


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> dict[str, torch.Tensor]:
    """Per bin m: `count` |B_m|, `confidence` mean conf_i and `accuracy` mean [pred_i = y_i] over i in B_m
    (0 for empty bins), and the bin `edges` (n_bins + 1)."""
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # the number of inner edges <= conf: left-closed bins, and 1.0 (above every inner edge) joins the last bin
    index = torch.bucketize(confidence, edges[1:-1], right=True)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    confidence_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    occupied = count.clamp(min=1)
    return {
        "count": count,
        "confidence": confidence_sum / occupied,
        "accuracy": correct_sum / occupied,
        "edges": edges,
    }


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error sum_m (|B_m| / N) |acc(B_m) - conf(B_m)|, a fraction in [0, 1]
    (tables show it as percent)."""
    bins = reliability_bins(probs, labels, n_bins)
    gaps = (bins["accuracy"] - bins["confidence"]).abs()
    return (bins["count"] / bins["count"].sum() * gaps).sum().item()


def mce(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Maximum calibration error max over non-empty bins of |acc(B_m) - conf(B_m)|, a fraction in [0, 1]."""
    bins = reliability_bins(probs, labels, n_bins)
    gaps = (bins["accuracy"] - bins["confidence"]).abs()
    return gaps[bins["count"] > 0].max().item()


def error_detection_auroc(uncertainty: torch.Tensor, wrong: torch.Tensor) -> float:
    """How well a per-question uncertainty `uncertainty` [N] (any score, larger = less sure: 1 - conf_i,
    the mutual information, ...) ranks the wrongly answered questions `wrong` [N] (bool) above the right
    ones: the AUROC P(u_w > u_r) + P(u_w = u_r) / 2 over pairs of a wrong question w and a right one r.
    0.5 is no better than chance, 1 puts every error above every right answer; a fraction in [0, 1].
    Undefined (ValueError) when all answers are right or all wrong."""
    if wrong.all() or not wrong.any():
        raise ValueError("error_detection_auroc needs both wrongly and rightly answered questions")
    return binary_auroc(uncertainty.double(), wrong.long()).item()


def all_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The protocol's numbers with explicit units: percent for accuracy / ECE / MCE, nats for NLL."""
    return {
        "accuracy_percent": 100 * accuracy(probs, labels),
        "ece_percent": 100 * ece(probs, labels),
        "mce_percent": 100 * mce(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
    }
