"""One inducing-weight factor: a random matrix with a sparse inducing-weight Gaussian posterior.

The model (Ritter et al. 2021, as used by Bayesian-LoRA) for a factor `W` of
shape `d_out x d_in` (LoRA's A is `r x d_in`, B is `d_out x r`):

    prior      vec(U) ~ N(0, K_r (x) K_c),   K_r = Z_r Z_r^T + D_r^2,  K_c = Z_c Z_c^T + D_c^2
    whitened   U = L_r V L_c^T,  L = chol(K),  p(V) = N(0, I)
    posterior  V0 ~ N(M, diag(S^2)),  V = T(V0)   (T: optional row-wise flow, see `flows`)
    conditional  W | U ~ sigma_p * N(T_r U T_c, lambda^2 Sigma_W)
                 T_r = Z_r^T K_r^-1,  T_c = K_c^-1 Z_c,
                 Sigma_W = I - (T_r Z_r) (x) (Z_c^T T_c)
                 sigma_p = prior_sd / sqrt(d_in)

Conditional noise is drawn with Matheron's rule, never by forming Sigma_W:
draw (E1, U_bar) jointly from the prior, E1 ~ N(0, I) of W's shape and
U_bar with Cov(U_bar) = K_r (x) K_c and Cov(vec U_bar, vec E1) = Z_r (x) Z_c,

    U_bar = Z_r E1 Z_c^T + L_r E2 D_c + D_r E3 Z_c^T,
            E2 ~ N(0, I_{m_r x m_c}),  E3 ~ N(0, I_{m_r x d_in}),

then `E1 - T_r U_bar T_c ~ N(0, Sigma_W)`. (The three terms have covariances
Z_rZ_r^T(x)Z_cZ_c^T, K_r(x)D_c^2 and D_r^2(x)Z_cZ_c^T, which add up to
exactly K_r (x) K_c. A fourth term `D_r E4 D_c` with `D_r E3 L_c^T` in place
of the third, as sometimes written, over-counts D_r^2 (x) D_c^2 twice.)
The weight is then

    W = sigma_p * (T_r (U - lambda U_bar) T_c + lambda E1),

computed in whitened form (see `PriorProjection`): T_r U T_c = A_r^T V A_c
with A = L^-1 Z, so no inverse or Cholesky solve against Z is ever formed.

KL(q || p) per factor, in whitened coordinates:

    KL(q0 || N(0, I))                                      closed form
  + E_q0[ log N(V0; 0, I) - log N(T(V0); 0, I) - log|det dT/dV0| ]   one-sample MC (flow only; 0 without)
  + (d_out d_in / 2) (lambda^2 - 1 - 2 log lambda)          exact conditional term

The middle term is zero when the flow is the identity, so the Monte Carlo KL
then equals the closed form exactly. All factor maths runs in fp32 with
autocast disabled, whatever precision the surrounding model uses: the
Cholesky factorisations of Z Z^T + D^2 are not reliable in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bayeslora.flows import RowwiseAutoregressiveFlow

SAMPLE, MEAN = "sample", "mean"
SAMPLING_MODES = (SAMPLE, MEAN)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def gaussian_kl_to_standard(mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(sd^2)) || N(0, I)) = 1/2 sum(sd^2 + mean^2 - 1 - 2 log sd)."""
    return 0.5 * (sd.square() + mean.square() - 1.0 - 2.0 * sd.log()).sum()


def conditional_kl(entries: int, lam: torch.Tensor) -> torch.Tensor:
    """KL(N(m, lambda^2 C) || N(m, C)) for a full-rank C of size `entries`: n/2 (lambda^2 - 1 - 2 log lambda)."""
    return 0.5 * entries * (lam.square() - 1.0 - 2.0 * lam.log())


class PriorProjection:
    """The prior-side quantities of one factor, computed once per draw from Z and D.

    Whitening makes the projections cheap: with K = L L^T,
    T_r U T_c = Z_r^T K_r^-1 L_r V L_c^T K_c^-1 Z_c = A_r^T V A_c with A = L^-1 Z,
    so one triangular solve per side replaces the Cholesky solves.
    """

    def __init__(self, z_row: torch.Tensor, z_col: torch.Tensor, d_row: torch.Tensor, d_col: torch.Tensor) -> None:
        self.d_row, self.d_col = d_row, d_col
        self.chol_row = _jittered_cholesky(z_row @ z_row.T + torch.diag(d_row.square()))
        self.chol_col = _jittered_cholesky(z_col @ z_col.T + torch.diag(d_col.square()))
        self.a_row = torch.linalg.solve_triangular(self.chol_row, z_row, upper=False)  # L_r^-1 Z_r : m_r x d_out
        self.a_col = torch.linalg.solve_triangular(self.chol_col, z_col, upper=False)  # L_c^-1 Z_c : m_c x d_in

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """T_r U T_c for the whitened inducing matrix V (U = L_r V L_c^T)."""
        return self.a_row.T @ v @ self.a_col

    def whitened_joint_prior_inducing(self, e1: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """L_r^-1 U_bar L_c^-T for U_bar drawn jointly with E1 from the prior (Matheron's rule)."""
        m_r, m_c = self.d_row.numel(), self.d_col.numel()
        e2 = torch.randn(m_r, m_c, generator=generator, device=e1.device)
        e3 = torch.randn(m_r, self.a_col.shape[1], generator=generator, device=e1.device)
        # L_r^-1 (Z_r E1 Z_c^T) L_c^-T = A_r E1 A_c^T
        from_e1 = self.a_row @ (e1 @ self.a_col.T)
        # L_r^-1 (L_r E2 D_c) L_c^-T = (E2 D_c) L_c^-T
        from_e2 = torch.linalg.solve_triangular(self.chol_col.T, e2 * self.d_col, upper=True, left=False)
        # L_r^-1 (D_r E3 Z_c^T) L_c^-T = L_r^-1 D_r (E3 A_c^T)
        from_e3 = torch.linalg.solve_triangular(
            self.chol_row, self.d_row[:, None] * (e3 @ self.a_col.T), upper=False
        )
        return from_e1 + from_e2 + from_e3


def _jittered_cholesky(k: torch.Tensor) -> torch.Tensor:
    jitter = 1e-5 * k.diagonal().mean()
    return torch.linalg.cholesky(k + jitter * torch.eye(k.shape[0], dtype=k.dtype, device=k.device))


class InducingFactor(nn.Module):
    """A `d_out x d_in` random factor matrix; calling it on `x` computes `x @ W^T` for one draw of `W`.

    Sampling state (set by `bayeslora.sampling`):
      mode "sample": a fresh posterior draw of W at every call (default);
      mode "mean":   the deterministic limit: lambda = 0 and V = T(M) (no q0 or conditional noise);
      generator:     a seeded `torch.Generator` makes the draws reproducible;
      hold:          draw once, then reuse that W for every call until the state is reset.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        inducing_rows: int = 9,
        inducing_cols: int = 9,
        prior_sd: float = 0.1,
        lambda_init: float = 1e-3,
        max_lambda: float = 0.03,
        sd_init: float = 1e-3,
        max_sd_u: float = 0.1,
        flow: bool = True,
        flow_hidden: int = 16,
        flow_blocks: int = 2,
        flow_output_affine: bool = True,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.prior_scale = prior_sd / math.sqrt(in_features)
        self.max_lambda, self.max_sd_u = max_lambda, max_sd_u
        self.z_row = nn.Parameter(torch.randn(inducing_rows, out_features) / math.sqrt(inducing_rows))
        self.z_col = nn.Parameter(torch.randn(inducing_cols, in_features) / math.sqrt(inducing_cols))
        self.d_row_raw = nn.Parameter(torch.full((inducing_rows,), inverse_softplus(1e-3)))
        self.d_col_raw = nn.Parameter(torch.full((inducing_cols,), inverse_softplus(1e-3)))
        self.u_mean = nn.Parameter(torch.randn(inducing_rows, inducing_cols))
        self.u_sd_raw = nn.Parameter(torch.full((inducing_rows, inducing_cols), inverse_softplus(sd_init)))
        self.lambda_raw = nn.Parameter(torch.tensor(inverse_softplus(lambda_init)))
        self.flow = (
            RowwiseAutoregressiveFlow(inducing_cols, flow_hidden, flow_blocks, flow_output_affine) if flow else None
        )
        self.reset_sampling()

    # ----- sampling state -------------------------------------------------------------
    def reset_sampling(self, mode: str = SAMPLE, generator: torch.Generator | None = None, hold: bool = False) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; valid modes: {', '.join(SAMPLING_MODES)}")
        self.mode, self.generator, self.hold = mode, generator, hold
        self._held_weight: torch.Tensor | None = None

    # ----- constrained parameters --------------------------------------------------
    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.lambda_raw.float()).clamp(max=self.max_lambda)

    @property
    def u_sd(self) -> torch.Tensor:
        return F.softplus(self.u_sd_raw.float()).clamp(max=self.max_sd_u)

    def prior_projection(self) -> PriorProjection:
        return PriorProjection(
            self.z_row.float(), self.z_col.float(), F.softplus(self.d_row_raw.float()), F.softplus(self.d_col_raw.float())
        )

    # ----- the posterior -------------------------------------------------------------
    def whitened_inducing(self, generator: torch.Generator | None = None, mean: bool = False) -> torch.Tensor:
        """V = T(V0) for V0 ~ q0, or V = T(M) when `mean`."""
        v0 = self.u_mean.float()
        if not mean:
            v0 = v0 + self.u_sd * torch.randn(v0.shape, generator=generator, device=v0.device)
        return v0 if self.flow is None else self.flow(v0)[0]

    def mean_weight(self) -> torch.Tensor:
        """sigma_p * T_r U T_c with U at the posterior's deterministic point (no noise anywhere)."""
        with _fp32_region(self.u_mean):
            return self.prior_scale * self.prior_projection().project(self.whitened_inducing(mean=True))

    def sample_weight(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One posterior draw of W (reparameterised: differentiable in every posterior parameter)."""
        with _fp32_region(self.u_mean):
            proj = self.prior_projection()
            v = self.whitened_inducing(generator)
            lam = self.lam
            e1 = torch.randn(self.out_features, self.in_features, generator=generator, device=v.device)
            v_bar = proj.whitened_joint_prior_inducing(e1, generator)
            return self.prior_scale * (proj.project(v - lam * v_bar) + lam * e1)

    def weight_for_forward(self) -> torch.Tensor:
        if self.hold and self._held_weight is not None:
            return self._held_weight
        weight = self.mean_weight() if self.mode == MEAN else self.sample_weight(self.generator)
        if self.hold:
            self._held_weight = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_for_forward()
        return F.linear(x.to(weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x, weight)

    def kl_divergence(self) -> torch.Tensor:
        """KL(q(U) q(W|U) || p(U) p(W|U)); one-sample Monte Carlo for the flow part (see module docstring)."""
        with _fp32_region(self.u_mean):
            mean, sd = self.u_mean.float(), self.u_sd
            kl = gaussian_kl_to_standard(mean, sd)
            if self.flow is not None:
                v0 = mean + sd * torch.randn_like(mean)
                v, log_det = self.flow(v0)
                kl = kl + 0.5 * (v.square().sum() - v0.square().sum()) - log_det
            return kl + conditional_kl(self.out_features * self.in_features, self.lam)


def _fp32_region(reference: torch.Tensor) -> torch.autocast:
    """Autocast disabled on the device of `reference`: the factor's maths must run in fp32."""
    return torch.autocast(device_type=reference.device.type, enabled=False)
