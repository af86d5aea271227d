"""TFB: training-free Bayesianization of a trained LoRA.

Shi, Wang, Han, Zhang, Wang, "Training-Free Bayesianization for Low-Rank
Adapters of Large Language Models", NeurIPS 2025.

Start from the `map` adapter, trained as usual (the Gaussian-A layers of BLoB
are in place but noiseless and frozen during training, so training is exactly
MAP LoRA). After training, without any gradient step:
1. Per layer, the thin SVD B = U diag(d) V^T re-parameterises the adapter as
   B' = U diag(d), A' = V^T A (same product B'A' = BA).
2. A' gets a mean-field Gaussian with row-wise sd sigma / d_i: the weight
   update B'(A' + E) then carries isotropic noise of scale sigma in the
   directions the adapter spans, whatever the size of each singular value.
3. sigma is the largest value in [0, sigma_max] (sigma_max = 0.2, BLoB's
   prior sd) whose predictive keeps the held-out NLL, measured against the
   deterministic adapter's own predictions (pseudo-labels), within a relative
   budget:  |NLL(sigma) - NLL(0)| / NLL(0) <= budget  (default 0.01).
   Found by bisection (`search_steps` = 10 halvings, TFB's setting), each
   NLL(sigma) from `search_samples` seeded held draws.
The released code divides the ratio once more by the anchor-set size and
keeps the first sigma above the budget; we keep the paper's formulation
(largest sigma inside the budget).

Prediction: like BLoB, one held seeded draw of all A' per predictive sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, ContextManager

import torch
from accelerate.utils import tqdm
from torch import nn

from bayeslora.methods.base import PREDICTIVE_SAMPLES, register_method
from bayeslora.methods.blob import gaussian_layers, gaussian_lora, held_draw
from bayeslora.methods.map import PostHocMAP


@torch.no_grad()
def svd_reparameterise(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """B, A -> U diag(d), V^T A in every Gaussian-A layer; returns each A-sd root with its singular values d."""
    scales = []
    for layer in gaussian_layers(model):
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A_sqrt_sd:
                continue
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            u, d, vh = torch.linalg.svd(b.float(), full_matrices=False)
            b.copy_((u * d).to(b.dtype))
            a.copy_((vh @ a.float()).to(a.dtype))
            scales.append((layer.lora_A_sqrt_sd[adapter], d))
    return scales


@torch.no_grad()
def set_sigma(scales: list[tuple[nn.Parameter, torch.Tensor]], sigma: float) -> None:
    """sd(A'_ij) = sigma / d_i (stored as its square root, the layer's parameterisation)."""
    for sqrt_sd, d in scales:
        sd = sigma / (d + 1e-6)
        sqrt_sd.copy_(sd.sqrt().view(-1, 1).expand_as(sqrt_sd).to(sqrt_sd.dtype))


@register_method
class TFB(PostHocMAP):
    name: ClassVar[str] = "tfb"
    default_samples: ClassVar[int] = PREDICTIVE_SAMPLES

    def __init__(
        self, budget: float = 0.01, sigma_max: float = 0.2, search_steps: int = 10, search_samples: int = 4, **options: Any
    ) -> None:
        super().__init__(**options)
        self.budget, self.sigma_max = budget, sigma_max
        self.search_steps, self.search_samples = search_steps, search_samples
        self.sigma = 0.0

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        model = gaussian_lora(model, lora)
        for layer in gaussian_layers(model):
            layer.noise_in_training = False
            for sqrt_sd in layer.lora_A_sqrt_sd.values():
                sqrt_sd.requires_grad_(False)
                sqrt_sd.zero_()
        return model

    @torch.no_grad()
    def after_training(self, model, validation_batches, choice_logits, train_batches=None) -> None:
        model.eval()
        scales = svd_reparameterise(model)
        deterministic = [torch.softmax(choice_logits(model, batch).float(), -1) for batch in validation_batches]
        pseudo_labels = [probs.argmax(-1) for probs in deterministic]
        nll_0 = pseudo_label_nll(deterministic, pseudo_labels)

        # at most 1 + search_steps trials: sigma_max, then the bisection if sigma_max is over budget
        bar = tqdm(total=1 + self.search_steps, desc="tfb sigma search", unit="trial")

        def within_budget(sigma: float) -> bool:
            set_sigma(scales, sigma)
            draws = [self._batch_probs(model, batch, choice_logits) for batch in validation_batches]
            bar.update()
            return abs(pseudo_label_nll(draws, pseudo_labels) - nll_0) <= self.budget * nll_0

        low, high = 0.0, self.sigma_max
        if within_budget(high):
            low = high
        else:
            for _ in range(self.search_steps):
                middle = (low + high) / 2
                low, high = (middle, high) if within_budget(middle) else (low, middle)
        bar.close()
        self.sigma = low
        set_sigma(scales, self.sigma)

    def _batch_probs(self, model: nn.Module, batch: Any, choice_logits: Callable) -> torch.Tensor:
        """Mean softmax of one batch over `search_samples` held draws (fixed seeds: the search is deterministic)."""
        probs = [torch.softmax(choice_logits(model, batch).float(), -1) for _ in self._held(model)]
        return torch.stack(probs).mean(0)

    def _held(self, model: nn.Module) -> Iterator[None]:
        for context in self.draws(model, self.search_samples, seed=0):
            with context:
                yield

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        for sample in range(self.sample_count(n_samples)):
            yield held_draw(model, seed + sample)

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # the rotated factors and the per-row sds the search set are adapter tensors, saved by peft
        return {}, {"sigma": self.sigma}

    def load_fitted_state(self, model, tensors, values) -> None:
        self.sigma = float(values["sigma"])


def pseudo_label_nll(probs: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    """Mean -log p[label] over all batches, p clamped at 1e-12."""
    picked = torch.cat([p.gather(1, y.view(-1, 1)).squeeze(1).cpu() for p, y in zip(probs, labels)])
    return float(-picked.clamp_min(1e-12).log().mean())
