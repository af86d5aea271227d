"""A small masked autoregressive flow acting on the rows of the whitened inducing matrix.

Bayesian-LoRA's variational family is a diagonal Gaussian `q0(V0)` over the
whitened inducing matrix, optionally pushed through a flow `V = T(V0)` that is
applied to each of its rows independently (rows share the flow's weights).

`T` is an affine autoregressive transform whose shift and log-scale for
feature `i` depend only on features `< i` of the same row (a MADE conditioner
with residual blocks, Germain et al. 2015; Papamakarios et al. 2017):

    V[:, i] = V0[:, i] * exp(s_i(V0[:, <i])) + m_i(V0[:, <i])
    log|det dV/dV0| = sum over rows and features of s_i

We evaluate it in its parallel direction (from a sample `V0` of q0 to `V`),
which is what variational inference needs: draw `V0`, transform, and know the
log-determinant of the draw. The output layer starts at zero, so the flow
starts as the identity and the initial posterior is exactly `q0`.

With 9 features, hidden width 16 and two residual blocks the flow has 1,554
parameters, as in the released code.

All G flows of the same shape in a model run as one batched computation
(`apply_stacked`), which is what keeps the adapter's per-step overhead small.

Written here rather than taken from a flow library: the maintained libraries
(zuko, normflows, nflows) build conditional distributions or whole flows with
their own parameterisations and parameter counts; what we need is one
20-line transform with an exact log-determinant, batched over rows, whose
size matches the reference count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stack_parameters(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters of same-shaped modules stacked along a new leading dimension (differentiable)."""
    named = [dict(module.named_parameters()) for module in modules]
    return {name: torch.stack([params[name] for params in named]) for name in named[0]}


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 connectivity mask."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float(), persistent=False)

    def apply_stacked(self, params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
        """The layer with weights `params[prefix + "weight"]` stacked over groups: (G, n, in) -> (G, n, out)."""
        weight = params[prefix + "weight"] * self.mask
        return torch.baddbmm(params[prefix + "bias"].unsqueeze(1), x, weight.mT)


class RowwiseAutoregressiveFlow(nn.Module):
    """Affine masked autoregressive transform applied to every row of a matrix."""

    def __init__(self, features: int, hidden: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.features = features
        input_degrees = torch.arange(1, features + 1)
        # hidden units cycle through degrees 1..features-1 (MADE): unit of degree k sees inputs 1..k
        hidden_degrees = torch.arange(hidden) % max(1, features - 1) + min(1, features - 1)
        self.input_layer = MaskedLinear(features, hidden, hidden_degrees[:, None] >= input_degrees[None, :])
        block_mask = hidden_degrees[:, None] >= hidden_degrees[None, :]
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"first": MaskedLinear(hidden, hidden, block_mask), "second": MaskedLinear(hidden, hidden, block_mask)})
            for _ in range(blocks)
        )
        # outputs for feature i (shift and log-scale) may only see hidden units of degree < i
        output_degrees = input_degrees.repeat(2)
        self.output_layer = MaskedLinear(hidden, 2 * features, output_degrees[:, None] > hidden_degrees[None, :])
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)

    def forward(self, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows x features -> (transformed rows, total log|det Jacobian| as a scalar)."""
        v, log_det = self.apply_stacked(stack_parameters([self]), v0.unsqueeze(0))
        return v[0], log_det[0]

    def apply_stacked(self, params: dict[str, torch.Tensor], v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G flows of this shape at once: parameters stacked over G, v0 of shape (G, rows, features).

        Returns the transformed rows (G, rows, features) and the log-determinants (G,).
        """
        h = self.input_layer.apply_stacked(params, "input_layer.", v0)
        for index, block in enumerate(self.blocks):
            inner = block["first"].apply_stacked(params, f"blocks.{index}.first.", F.relu(h))
            h = h + block["second"].apply_stacked(params, f"blocks.{index}.second.", F.relu(inner))
        shift, log_scale = self.output_layer.apply_stacked(params, "output_layer.", h).chunk(2, dim=-1)
        return v0 * torch.exp(log_scale) + shift, log_scale.sum(dim=(-2, -1))
