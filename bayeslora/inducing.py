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
then equals the closed form exactly.

Noise scales (`noise_scales=True`): one scalar lambda scales the conditional noise
alike in every direction, and its KL prices every entry of W the same, so the data
cannot choose where the draws spread. With noise scales the conditional posterior is

    W | U ~ sigma_p * N(T_r U T_c, S D^2 S),   D = lambda diag(r) (x) diag(c),  S = Sigma_W^(1/2),

with a learned scale r_i per row and c_j per column. Its KL to the prior's conditional
is, exactly (S^-1 (S D^2 S) S^-1 = D^2),

    (1/2) (lambda^2 sum(r^2) sum(c^2) - d_out d_in - 2 log det D),
    log det D = d_out d_in log lambda + d_in sum(log r) + d_out sum(log c),

so one row's or one column's scale costs a few nats and the data can shrink the
noise where it hurts the likelihood and leave it elsewhere. The symmetric root S keeps
the prior's near-null directions (those U pins down) nearly free of noise, which
S D^2 S with any D respects and D Sigma_W D would not. S needs the eigenvectors of the
m x m Grams A A^T (see `_conditional_root`); at r = c = 1 the draws have Matheron's
distribution, N(0, lambda^2 Sigma_W).

Speed: a model has many factors of few distinct shapes (all q_proj A factors,
say). The maths below is written for a stack of G same-shaped factors at once
(`draw_weights`, `kl_terms`), so that a model-wide draw costs a few dozen
batched operations per shape instead of a few dozen per factor. All factor maths runs in fp32 with
autocast disabled, whatever precision the surrounding model uses: the
Cholesky factorisations of Z Z^T + D^2 are not reliable in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bayeslora.flows import RowwiseAutoregressiveFlow, stack_parameters

SAMPLE, MEAN = "sample", "mean"
Z_PERTURBATION = 0.01  # the released code's alpha_row = alpha_col
SAMPLING_MODES = (SAMPLE, MEAN)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def gaussian_kl_to_standard(mean: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(sd^2)) || N(0, I)) = 1/2 sum(sd^2 + mean^2 - 1 - 2 log sd), summed over the last two dims."""
    return 0.5 * (sd.square() + mean.square() - 1.0 - 2.0 * sd.log()).sum(dim=(-2, -1))


def conditional_kl(entries: int, lam: torch.Tensor) -> torch.Tensor:
    """KL(N(m, lambda^2 C) || N(m, C)) for a full-rank C of size `entries`: n/2 (lambda^2 - 1 - 2 log lambda)."""
    return 0.5 * entries * (lam.square() - 1.0 - 2.0 * lam.log())


class InducingFactor(nn.Module):
    """A `d_out x d_in` random factor matrix; calling it on `x` computes `x @ W^T` for one draw of `W`.

    Sampling state (set by `bayeslora.sampling`):
      mode "sample": a fresh posterior draw of W for every forward pass (default);
      mode "mean":   the deterministic limit: lambda = 0 and V = T(M) (no q0 or conditional noise);
      generator:     a seeded `torch.Generator` makes the draws reproducible;
      hold:          draw once, then reuse that W until the state is reset.
    Inside a Bayesian-LoRA model the draws of all factors are made together, batched by shape,
    just before each forward pass of the model (see `adapter`); a factor called on its own
    draws for itself.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        inducing_rows: int = 9,
        inducing_cols: int = 9,
        prior_sd: float = 1.0,
        lambda_init: float = 1.0,
        max_lambda: float = 1.0,
        sd_init: float = 0.5,
        max_sd_u: float = 1.0,
        flow: bool = True,
        flow_hidden: int = 16,
        flow_blocks: int = 2,
        learn_prior_lambda: bool = False,
        noise_scales: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.prior_scale = prior_sd / math.sqrt(in_features)
        self.max_lambda, self.max_sd_u = max_lambda, max_sd_u
        self.learn_prior_lambda = learn_prior_lambda
        self.z_row = nn.Parameter(torch.randn(inducing_rows, out_features) / math.sqrt(inducing_rows))
        self.z_col = nn.Parameter(torch.randn(inducing_cols, in_features) / math.sqrt(inducing_cols))
        self.d_row_raw = nn.Parameter(torch.full((inducing_rows,), inverse_softplus(1e-3)))
        self.d_col_raw = nn.Parameter(torch.full((inducing_cols,), inverse_softplus(1e-3)))
        # the released code's learned perturbation scale of each inducing location (see `_perturbed`)
        self.z_row_rho = nn.Parameter(torch.full((inducing_rows,), inverse_softplus(1e-3)))
        self.z_col_rho = nn.Parameter(torch.full((inducing_cols,), inverse_softplus(1e-3)))
        self.u_mean = nn.Parameter(torch.randn(inducing_rows, inducing_cols))
        self.u_sd_raw = nn.Parameter(torch.full((inducing_rows, inducing_cols), inverse_softplus(sd_init)))
        self.lambda_raw = nn.Parameter(torch.tensor(inverse_softplus(lambda_init)))
        if noise_scales:  # per row and per column of W, multiplying lambda (see the module docstring)
            self.noise_row_raw = nn.Parameter(torch.full((out_features,), inverse_softplus(1.0)))
            self.noise_col_raw = nn.Parameter(torch.full((in_features,), inverse_softplus(1.0)))
        self.noise_scales = noise_scales
        self.flow = (
            RowwiseAutoregressiveFlow(inducing_cols, flow_hidden, flow_blocks) if flow else None
        )
        # everything that must agree for factors to be drawn as one batch, except the device
        self._batch_key = (out_features, in_features, inducing_rows, inducing_cols, self.prior_scale, max_lambda,
                           max_sd_u, flow and (flow_hidden, flow_blocks), learn_prior_lambda, noise_scales)
        self.reset_sampling()

    def signature(self) -> tuple:
        """Factors with equal signatures can be drawn together as one batch."""
        return self._batch_key, self.u_mean.device

    # ----- sampling state -------------------------------------------------------------
    def reset_sampling(self, mode: str = SAMPLE, generator: torch.Generator | None = None, hold: bool = False) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; valid modes: {', '.join(SAMPLING_MODES)}")
        self.mode, self.generator, self.hold = mode, generator, hold
        self.current_weight: torch.Tensor | None = None
        self.drawn_by_model = False

    # ----- constrained parameters (for inspection and logging) -------------------------
    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.lambda_raw.float()).clamp(max=self.max_lambda)

    @property
    def u_sd(self) -> torch.Tensor:
        return F.softplus(self.u_sd_raw.float()).clamp(max=self.max_sd_u)

    @property
    def noise_row(self) -> torch.Tensor:
        """The conditional noise's scale per row of W (ones without `noise_scales`)."""
        if not self.noise_scales:
            return torch.ones(self.out_features, device=self.u_mean.device)
        return F.softplus(self.noise_row_raw.float())

    @property
    def noise_col(self) -> torch.Tensor:
        """The conditional noise's scale per column of W (ones without `noise_scales`)."""
        if not self.noise_scales:
            return torch.ones(self.in_features, device=self.u_mean.device)
        return F.softplus(self.noise_col_raw.float())

    # ----- one factor: thin wrappers of the batched maths ------------------------------
    def mean_weight(self) -> torch.Tensor:
        """sigma_p * T_r U T_c with U at the posterior's deterministic point (no noise anywhere)."""
        return draw_weights([self], MEAN)[0]

    def sample_weight(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One posterior draw of W (reparameterised: differentiable in every posterior parameter)."""
        return draw_weights([self], SAMPLE, generator)[0]

    def kl_divergence(self) -> torch.Tensor:
        """KL(q(U) q(W|U) || p(U) p(W|U)); one-sample Monte Carlo for the flow part (see module docstring)."""
        return kl_terms([self])[0]

    # ----- saving: what a plain LoRA layer reads ---------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Also save the posterior-mean matrix under `weight`, the name of a plain LoRA factor.

        peft without bayeslora (`PeftModel.from_pretrained`, lm-eval's `peft=`) loads `lora_A.weight` and
        `lora_B.weight` only: it then gets the posterior-mean LoRA instead of keeping its random initial
        factors, which with B = 0 would silently give back the base model.
        """
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.u_mean.is_meta:  # a weightless skeleton (`adapter.check_adapter`) needs only the shape
            destination[prefix + "weight"] = torch.empty(self.out_features, self.in_features, device="meta")
            return
        with torch.no_grad():
            destination[prefix + "weight"] = self.mean_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + "weight", None)  # derived from the posterior on saving; nothing to load
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.current_weight is None:
            self.current_weight = draw_weights([self], self.mode, self.generator)[0]
        weight = self.current_weight
        if not (self.hold or self.drawn_by_model):  # called on its own: the next call draws afresh
            self.current_weight = None
        return F.linear(x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype), weight)


def _fp32_region(reference: torch.Tensor) -> torch.autocast:
    """Autocast disabled on the device of `reference`: the factor's maths must run in fp32."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


def _stacked(factors: Sequence[InducingFactor]) -> dict[str, torch.Tensor]:
    return {name: value.float() for name, value in stack_parameters(list(factors)).items()}


def _flow_parameters(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("flow."): value for name, value in params.items() if name.startswith("flow.")}


def _perturbed(z: torch.Tensor, rho: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Z + 0.01 * eps * softplus(rho) per inducing location, eps ~ U[0, 1): the released code's Z perturbation.

    As there, the perturbed locations enter only the prior covariance K = Z Z^T + D^2 (and so its
    Cholesky factor) of a posterior draw; the projections use Z itself, and the mean mode none.
    """
    eps = torch.rand(z.shape, generator=generator, device=z.device)
    return z + Z_PERTURBATION * eps * F.softplus(rho)[..., None]


def _jittered_cholesky(k: torch.Tensor) -> torch.Tensor:
    jitter = 1e-5 * k.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return torch.linalg.cholesky(k + jitter[:, None, None] * eye)


def _whitened_projection(z_prior: torch.Tensor, d: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1 Z) with L L^T = Z_prior Z_prior^T + D^2 (Z_prior: the perturbed locations of a draw, or Z)."""
    chol = _jittered_cholesky(z_prior @ z_prior.mT + torch.diag_embed(d.square()))
    return chol, torch.linalg.solve_triangular(chol, z, upper=False)


def _conditional_root(a_row: torch.Tensor, a_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The symmetric root S of Sigma_W = I - (A_r^T A_r) (x) (A_c^T A_c), as (Q_r, Q_c, shrink) with

        S X = X - Q_r (shrink * (Q_r^T X Q_c)) Q_c^T   for X of W's shape,

    where A_r^T A_r = Q_r diag(alpha) Q_r^T (Q_r: d_out x m_r, orthonormal columns), likewise A_c with beta,
    and shrink = 1 - sqrt(1 - alpha beta^T). The eigenvalues lie in (0, 1) and often crowd near 1
    (small D), so the m x m eigenproblems are solved in float64, where their gradients stay accurate;
    1 - alpha beta is floored at 0 for draws whose perturbed Z puts an eigenvalue a hair above 1.
    """

    def eigenbasis(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = torch.linalg.eigh((a @ a.mT).double())
        # more inducing rows than W has (9 for LoRA's rank 8): the surplus eigenvalues are 0 and their
        # directions do not exist in W; they are dropped (zero basis columns) rather than divided by 0
        present = values > 1e-9 * values.amax(-1, keepdim=True)
        inverse_root = torch.where(present, values.clamp(min=1e-300).rsqrt(), 0.0)
        return torch.where(present, values, 0.0), a.mT.double() @ vectors * inverse_root[:, None, :]

    alpha, q_row = eigenbasis(a_row)
    beta, q_col = eigenbasis(a_col)
    shrink = 1.0 - (1.0 - alpha[:, :, None] * beta[:, None, :]).clamp(min=0.0).sqrt()
    return q_row.to(a_row.dtype), q_col.to(a_row.dtype), shrink.to(a_row.dtype)


def _scaled_conditional_noise(
    root: tuple[torch.Tensor, torch.Tensor, torch.Tensor], noise: torch.Tensor, row: torch.Tensor, col: torch.Tensor
) -> torch.Tensor:
    """S (diag(row) E diag(col)) for standard normal E: a draw of N(0, S D^2 S), D = diag(row) (x) diag(col)."""
    q_row, q_col, shrink = root
    x = row[:, :, None] * noise * col[:, None, :]
    return x - q_row @ (shrink * (q_row.mT @ x @ q_col)) @ q_col.mT


def draw_weights(
    factors: Sequence[InducingFactor], mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weights (G, d_out, d_in) of G factors of one signature: posterior draws, or the mean limit.

    With K = L L^T and A = L^-1 Z, T_r U T_c = A_r^T V A_c, and the Matheron-rule term
    L_r^-1 U_bar L_c^-T = A_r E1 A_c^T + (E2 D_c) L_c^-T + L_r^-1 D_r (E3 A_c^T).
    """
    template = factors[0]
    with _fp32_region(template.u_mean):
        p = _stacked(factors)
        d_row, d_col = F.softplus(p["d_row_raw"]), F.softplus(p["d_col_raw"])
        z_row, z_col = p["z_row"], p["z_col"]
        if mode == SAMPLE:
            z_row, z_col = _perturbed(z_row, p["z_row_rho"], generator), _perturbed(z_col, p["z_col_rho"], generator)
        chol_row, a_row = _whitened_projection(z_row, d_row, p["z_row"])  # A_r = L_r^-1 Z_r : G x m_r x d_out
        chol_col, a_col = _whitened_projection(z_col, d_col, p["z_col"])  # A_c = L_c^-1 Z_c : G x m_c x d_in

        def random(*shape: int) -> torch.Tensor:
            return torch.randn(len(factors), *shape, generator=generator, device=a_row.device)

        v0 = p["u_mean"]
        if mode == SAMPLE:
            sd = F.softplus(p["u_sd_raw"]).clamp(max=template.max_sd_u)
            v0 = v0 + sd * random(*v0.shape[1:])
        v = v0 if template.flow is None else template.flow.apply_stacked(_flow_parameters(p), v0)[0]
        if mode == MEAN:
            return template.prior_scale * (a_row.mT @ v @ a_col)

        lam = F.softplus(p["lambda_raw"]).clamp(max=template.max_lambda)[:, None, None]
        m_r, m_c, d_in = v.shape[1], v.shape[2], a_col.shape[2]
        e1 = random(template.out_features, d_in)
        if template.noise_scales:
            noise = _scaled_conditional_noise(_conditional_root(a_row, a_col), e1, *_noise_scales(p, template))
            return template.prior_scale * (a_row.mT @ v @ a_col + lam * noise)
        e2, e3 = random(m_r, m_c), random(m_r, d_in)
        e3_projected = e3 @ a_col.mT
        v_bar = (
            a_row @ (e1 @ a_col.mT)
            + torch.linalg.solve_triangular(chol_col.mT, e2 * d_col[:, None, :], upper=True, left=False)
            + torch.linalg.solve_triangular(chol_row, d_row[:, :, None] * e3_projected, upper=False)
        )
        return template.prior_scale * (a_row.mT @ (v - lam * v_bar) @ a_col + lam * e1)


@torch.no_grad()
def draw_variance_parts(
    factors: Sequence[InducingFactor], draws: int = 64, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of a posterior draw's spread q(U) carries: tr Cov(W) of each of G factors, split into
    (the part from q(U), the part from the conditional noise), each of shape (G,).

    V and the conditional noise are independent, so with G_r = A_r A_r^T and G_c = A_c A_c^T:

        from q(U)         sigma_p^2 E tr((V - E V)^T G_r (V - E V) G_c)
        conditional       sigma_p^2 lambda^2 tr(Sigma_W) = sigma_p^2 lambda^2 (d_out d_in - tr G_r tr G_c)
                          (with noise scales, sigma_p^2 tr(D^2 Sigma_W), D = lambda diag(r) (x) diag(c))

    Without a flow, Cov(V) = diag(S^2) and the first is sigma_p^2 sum_ij S_ij^2 (G_r)_ii (G_c)_jj; with
    one it is estimated from `draws` draws of V. Both at the unperturbed inducing locations (the released
    Z perturbation, 1% of Z, is left out). The conditional part dwarfs the other unless lambda is small:
    it spans d_out d_in - m_r m_c directions of W, q(U) only m_r m_c.
    """
    template = factors[0]
    with _fp32_region(template.u_mean):
        p = _stacked(factors)
        _, a_row = _whitened_projection(p["z_row"], F.softplus(p["d_row_raw"]), p["z_row"])
        _, a_col = _whitened_projection(p["z_col"], F.softplus(p["d_col_raw"]), p["z_col"])
        gram_row, gram_col = a_row @ a_row.mT, a_col @ a_col.mT
        diag_row, diag_col = gram_row.diagonal(dim1=-2, dim2=-1), gram_col.diagonal(dim1=-2, dim2=-1)
        sd = F.softplus(p["u_sd_raw"]).clamp(max=template.max_sd_u)
        if template.flow is None:
            inducing = (sd.square() * diag_row[:, :, None] * diag_col[:, None, :]).sum(dim=(-2, -1))
        else:
            groups, rows, cols = sd.shape
            v0 = p["u_mean"][:, None] + sd[:, None] * torch.randn(groups, draws, rows, cols, generator=generator,
                                                                  device=sd.device)
            # the flow acts on each row alone: the draws' rows go through it as one stack
            v = template.flow.apply_stacked(_flow_parameters(p), v0.reshape(groups, draws * rows, cols))[0]
            centred = v.reshape(groups, draws, rows, cols)
            centred = centred - centred.mean(dim=1, keepdim=True)
            inducing = (centred.mT @ gram_row[:, None] @ centred @ gram_col[:, None]).diagonal(dim1=-2, dim2=-1)
            inducing = inducing.sum(-1).mean(1)
            inducing = inducing * draws / max(draws - 1, 1)  # unbiased
        lam = F.softplus(p["lambda_raw"]).clamp(max=template.max_lambda)
        # tr(S D^2 S) = tr(D^2 Sigma_W) = sum(r^2) sum(c^2) - (r^2 . diag A_r^T A_r)(c^2 . diag A_c^T A_c)
        row_sq, col_sq = (scales.square() for scales in _noise_scales(p, template))
        trace = row_sq.sum(-1) * col_sq.sum(-1) - (row_sq * a_row.square().sum(-2)).sum(-1) * (
            col_sq * a_col.square().sum(-2)).sum(-1)
        scale = template.prior_scale ** 2
        return scale * inducing, scale * lam.square() * trace


def kl_parts(factors: Sequence[InducingFactor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inducing KL, conditional KL) of each of G factors of one signature, each of shape (G,).

    The inducing part is KL(q(V) || N(0, I)) (closed form plus the flow's one-sample correction);
    the conditional part is (d_out d_in / 2)(lambda^2 - 1 - 2 log lambda), which does not depend on U
    (with noise scales, the module docstring's formula).
    With `learn_prior_lambda` the conditional prior's scale is a hyperparameter fitted with lambda
    (empirical Bayes): its optimum is the posterior's lambda, where the conditional part is exactly 0,
    so lambda is then set by the data term alone.
    """
    template = factors[0]
    with _fp32_region(template.u_mean):
        p = _stacked(factors)
        mean = p["u_mean"]
        sd = F.softplus(p["u_sd_raw"]).clamp(max=template.max_sd_u)
        inducing = gaussian_kl_to_standard(mean, sd)
        if template.flow is not None:
            v0 = mean + sd * torch.randn_like(mean)
            v, log_det = template.flow.apply_stacked(_flow_parameters(p), v0)
            inducing = inducing + 0.5 * (v.square().sum(dim=(-2, -1)) - v0.square().sum(dim=(-2, -1))) - log_det
        entries = template.out_features * template.in_features
        # with the prior's conditional scale learned it equals lambda, which then cancels from the KL
        lam = torch.ones_like(inducing) if template.learn_prior_lambda else (
            F.softplus(p["lambda_raw"]).clamp(max=template.max_lambda))
        if not template.noise_scales:
            return inducing, conditional_kl(entries, lam)
        row_sq, col_sq = (scales.square() for scales in _noise_scales(p, template))
        log_det = entries * lam.log() + 0.5 * (template.in_features * row_sq.log().sum(-1)
                                               + template.out_features * col_sq.log().sum(-1))
        return inducing, 0.5 * (lam.square() * row_sq.sum(-1) * col_sq.sum(-1) - entries) - log_det


def _noise_scales(p: dict[str, torch.Tensor], template: InducingFactor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise scales per row (G, d_out) and per column (G, d_in); ones without `noise_scales`."""
    if template.noise_scales:
        return F.softplus(p["noise_row_raw"]), F.softplus(p["noise_col_raw"])
    groups = p["u_mean"].shape[0]
    return (p["u_mean"].new_ones(groups, template.out_features), p["u_mean"].new_ones(groups, template.in_features))


def kl_terms(factors: Sequence[InducingFactor]) -> torch.Tensor:
    """KL(q || p) of each of G factors of one signature, shape (G,)."""
    inducing, conditional = kl_parts(factors)
    return inducing + conditional
