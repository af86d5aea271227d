"""Temperature scaling of a MAP LoRA, fitted on the held-out validation set.

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017. One scalar
T > 0 divides every per-choice logit before the softmax; it changes
confidence, never the predicted answer. T minimises the validation NLL
    T* = argmin_T  (1/n) sum_i -log softmax(z_i / T)[y_i],
optimised over log T with L-BFGS (the NLL is convex in 1/T). The adapter
itself is the `map` adapter (weight decay 0.01), trained as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from bayeslora.methods.base import register_method
from bayeslora.methods.map import PostHocMAP


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """logits / T with padded choices (-inf) kept at -inf; their gradient is 0, not NaN (-inf * 0)."""
    padded = torch.isinf(logits)
    return (torch.where(padded, torch.zeros_like(logits), logits) / temperature).masked_fill(padded, float("-inf"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising mean NLL of softmax(logits / T) at `labels`; logits: (n, C), -inf = padding."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        nll = -torch.log_softmax(scale_logits(logits, log_t.exp()), dim=-1).gather(1, labels.view(-1, 1)).mean()
        nll.backward()
        return nll

    optimiser.step(closure)
    return float(log_t.detach().exp())


@torch.no_grad()
def collect_logits(
    model: nn.Module, batches: list[Any], choice_logits: Callable[[nn.Module, Any], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-choice logits and answers of all `batches`, padded to a common number of choices with -inf."""
    logits = [choice_logits(model, batch).float().cpu() for batch in batches]
    width = max(block.shape[1] for block in logits)
    padded = [torch.nn.functional.pad(block, (0, width - block.shape[1]), value=float("-inf")) for block in logits]
    return torch.cat(padded), torch.cat([batch["answers"] for batch in batches])


@register_method
class Temperature(PostHocMAP):
    name: ClassVar[str] = "temperature"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.temperature = 1.0

    def after_training(self, model, validation_batches, choice_logits, train_batches=None) -> None:
        model.eval()
        logits, labels = collect_logits(model, validation_batches, choice_logits)
        self.temperature = fit_temperature(logits, labels)

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return scale_logits(logits, self.temperature)

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"temperature": self.temperature}

    def load_fitted_state(self, model, tensors, values) -> None:
        self.temperature = float(values["temperature"])
