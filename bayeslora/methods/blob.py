"""BLoB: Bayesian Low-Rank Adaptation by Backpropagation.

Wang, Shi, Han, Metaxas, Wang, NeurIPS 2024 (arXiv 2406.11675).

Posterior: each LoRA factor A (r x d_in) is mean-field Gaussian,
    q(A) = N(M, diag(Omega^2)),  Omega = G^2 (elementwise),
with G learnable and initialised U(eps/sqrt 2, eps), eps = 0.05; B stays a
point estimate (peft's usual B = 0 start). Prior: p(A) = N(0, beta^2 I),
beta = 0.2 (BLoB's defaults). The KL is closed form, summed over entries:
    KL = sum_ij [ log(beta / Omega_ij) + (Omega_ij^2 + M_ij^2) / (2 beta^2) - 1/2 ].

Training noise is Flipout (Wen et al. 2018): one noise matrix
E = Omega * eps_E per forward, decorrelated per token by random signs,
    noise(x) = B (((x * s_in) E^T) * s_out) * alpha / r,
so each token sees its own pseudo-independent weight at the cost of one
draw. KL re-weighting (BLoB, after Blundell et al. 2015): the i-th of the M
minibatches of an epoch adds pi_i * KL to its mean NLL, with
    pi_i = 2^i / (2^(M+1) - 1),   i = 1..M,
so the weights of one epoch sum to about 1. M = ceil(N_train / batch_size);
`batch_size` must match the loop's (option, default 8).

Not reproduced: BLoB's released code steps the KL gradient with a second SGD
optimiser (lr 0.02); here KL and NLL gradients share the loop's one AdamW.

Prediction on the shared path: each predictive sample holds ONE seeded draw
of every A for all forwards inside its context (no Flipout at test time), so
the choices of a question and all questions of a sample see the same weights.
Outside a draw context in eval mode the layer is deterministic (A = M). Paper
N = 10 at test; here N follows the shared sample count (4 unless set).

The layer is a subclass of peft's `lora.Linear`, registered through peft's
custom-module hook (`LoraConfig._register_custom_module`), so peft saves,
loads, merges the mean and toggles adapters as for any LoRA layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar, ContextManager

import torch
from peft import get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from bayeslora.methods.base import PREDICTIVE_SAMPLES, Method, register_method
from bayeslora.methods.lora import lora_config


class GaussianALinear(LoraLinear):
    """A peft LoRA linear layer whose A factor carries a mean-field Gaussian: sd = lora_A_sqrt_sd ** 2."""

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_A_sqrt_sd",)

    #: BLoB's initial G range (eps/sqrt(2), eps)
    init_eps: ClassVar[float] = 0.05

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if "lora_A_sqrt_sd" not in self._modules:  # first adapter: peft's update_layer already expects the dict
            self.lora_A_sqrt_sd = nn.ParameterDict()
            self.held_noise: dict[str, torch.Tensor] | None = None
            self.noise_in_training = True
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        weight = self.lora_A[adapter_name].weight
        sqrt_sd = torch.empty_like(weight).uniform_(self.init_eps / math.sqrt(2), self.init_eps)
        self.lora_A_sqrt_sd[adapter_name] = nn.Parameter(sqrt_sd)

    def a_sd(self, adapter_name: str) -> torch.Tensor:
        return self.lora_A_sqrt_sd[adapter_name] ** 2

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A_sqrt_sd:
                noise = self._noise_output(x, adapter)
                if noise is not None:
                    result = result + noise.to(result.dtype)
        return result

    def _noise_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor | None:
        """B (A_noise x) * scaling for this forward, or None when the layer is deterministic."""
        if self.held_noise is not None:
            x = self.lora_dropout[adapter](self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype))
            hidden = x @ self.held_noise[adapter].to(x.dtype).T
        elif self.training and self.noise_in_training:
            x = self.lora_dropout[adapter](self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype))
            sd = self.a_sd(adapter)
            noise = sd * torch.randn_like(sd)
            sign_in = torch.empty_like(x).bernoulli_(0.5) * 2 - 1
            sign_out = torch.empty(*x.shape[:-1], sd.shape[0], dtype=x.dtype, device=x.device).bernoulli_(0.5) * 2 - 1
            hidden = ((x * sign_in) @ noise.T) * sign_out
        else:
            return None
        return hidden @ self.lora_B[adapter].weight.T * self.scaling[adapter]


def gaussian_layers(model: nn.Module) -> list[GaussianALinear]:
    return [module for module in model.modules() if isinstance(module, GaussianALinear)]


@contextlib.contextmanager
def held_draw(model: nn.Module, seed: int) -> Iterator[None]:
    """Inside: every Gaussian A factor fixed at one draw M + Omega * eps, eps from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    layers = gaussian_layers(model)
    for layer in layers:
        layer.held_noise = {}
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A_sqrt_sd:
                sd = layer.a_sd(adapter).detach()
                eps = torch.randn(sd.shape, generator=generator, dtype=sd.dtype).to(sd.device)
                layer.held_noise[adapter] = sd * eps
    try:
        yield
    finally:
        for layer in layers:
            layer.held_noise = None


def gaussian_kl(mean: torch.Tensor, sd: torch.Tensor, prior_sd: float) -> torch.Tensor:
    """sum_ij KL(N(mean_ij, sd_ij^2) || N(0, prior_sd^2)), in nats, computed in float64."""
    mean, sd = mean.double(), sd.double()
    return (math.log(prior_sd) - sd.log() + (sd**2 + mean**2) / (2 * prior_sd**2) - 0.5).sum()


def kl_reweighting(step_in_epoch: int, batches_per_epoch: int) -> float:
    """Blundell et al.'s pi_i = 2^i / (2^(M+1) - 1) for minibatch i in 1..M, written to avoid overflow."""
    return 2.0 ** (step_in_epoch - batches_per_epoch - 1) / (1 - 2.0 ** (-batches_per_epoch - 1))


def gaussian_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """A peft model whose targeted linear layers are `GaussianALinear`."""
    config = lora_config(lora)
    config._register_custom_module({nn.Linear: GaussianALinear})
    return get_peft_model(model, config)


@register_method
class BLoB(Method):
    name: ClassVar[str] = "blob"
    default_samples: ClassVar[int] = PREDICTIVE_SAMPLES
    needs_run_folder: ClassVar[bool] = True  # its Gaussian layers (their sds are saved with the adapter by peft)

    def __init__(self, prior_sd: float = 0.2, kl_reweighting: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.prior_sd = prior_sd
        self.kl_reweighting = kl_reweighting

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        return gaussian_lora(model, lora)

    def kl_divergence(self, model: nn.Module) -> torch.Tensor:
        """KL(q(A) || p(A)) summed over the Gaussian A factors of the active adapters (float32, with grad)."""
        total = torch.zeros((), dtype=torch.float64)
        for layer in gaussian_layers(model):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A_sqrt_sd:
                    kl = gaussian_kl(layer.lora_A[adapter].weight, layer.a_sd(adapter), self.prior_sd)
                    total = total + kl.to(total.device)
        return total.float()

    def regulariser(
        self, model: nn.Module, n_train: int, step_in_epoch: int = 0, batches_per_epoch: int = 1
    ) -> torch.Tensor:
        """pi_i * KL with BLoB's re-weighting over the epoch's M minibatches (i = step_in_epoch + 1), else KL / M.

        The position comes from the loop, so gradient accumulation and resumed runs weight each step alike.
        """
        m = max(1, batches_per_epoch)
        weight = kl_reweighting(step_in_epoch % m + 1, m) if self.kl_reweighting else 1 / m
        return weight * self.kl_divergence(model)

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        for sample in range(self.sample_count(n_samples)):
            yield held_draw(model, seed + sample)
