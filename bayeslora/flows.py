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

With `output_affine=True` an element-wise affine layer (a learned scale and
shift per feature, 2 x features parameters) follows the autoregressive
transform; with 9 features, hidden width 16 and two residual blocks the flow
then has 1,554 + 18 parameters, the setting that reproduces the paper's
parameter count (see `BayesLoraConfig.flow_output_affine`).

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


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 connectivity mask."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedResidualBlock(nn.Module):
    """h + W2 relu(W1 relu(h)), both layers masked so degrees never decrease."""

    def __init__(self, width: int, mask: torch.Tensor) -> None:
        super().__init__()
        self.first = MaskedLinear(width, width, mask)
        self.second = MaskedLinear(width, width, mask)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.second(F.relu(self.first(F.relu(h))))


class RowwiseAutoregressiveFlow(nn.Module):
    """Affine masked autoregressive transform applied to every row of a matrix."""

    def __init__(self, features: int, hidden: int = 16, blocks: int = 2, output_affine: bool = False) -> None:
        super().__init__()
        self.features = features
        input_degrees = torch.arange(1, features + 1)
        # hidden units cycle through degrees 1..features-1 (MADE): unit of degree k sees inputs 1..k
        hidden_degrees = torch.arange(hidden) % max(1, features - 1) + min(1, features - 1)
        self.input_layer = MaskedLinear(features, hidden, hidden_degrees[:, None] >= input_degrees[None, :])
        self.blocks = nn.ModuleList(
            MaskedResidualBlock(hidden, hidden_degrees[:, None] >= hidden_degrees[None, :]) for _ in range(blocks)
        )
        # outputs for feature i (shift and log-scale) may only see hidden units of degree < i
        output_degrees = input_degrees.repeat(2)
        self.output_layer = MaskedLinear(hidden, 2 * features, output_degrees[:, None] > hidden_degrees[None, :])
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)
        if output_affine:
            self.affine_log_scale = nn.Parameter(torch.zeros(features))
            self.affine_shift = nn.Parameter(torch.zeros(features))
        else:
            self.affine_log_scale = self.affine_shift = None

    def forward(self, v0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows x features -> (transformed rows, total log|det Jacobian| as a scalar)."""
        h = self.input_layer(v0)
        for block in self.blocks:
            h = block(h)
        shift, log_scale = self.output_layer(h).chunk(2, dim=-1)
        v = v0 * torch.exp(log_scale) + shift
        log_det = log_scale.sum()
        if self.affine_log_scale is not None:
            v = v * torch.exp(self.affine_log_scale) + self.affine_shift
            log_det = log_det + v0.shape[0] * self.affine_log_scale.sum()
        return v, log_det
