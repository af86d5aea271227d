"""Laplace-LoRA: post-hoc Kronecker-factored Laplace on the LoRA weights of a MAP adapter.

Yang, Robeyns, Wang, Aitchison, "Bayesian Low-rank Adaptation for Large
Language Models", ICLR 2024.

The adapter is the `map` adapter (weight decay 0.01), trained as usual. After
training, each LoRA weight matrix W (lora_A or lora_B of every adapted module,
`laplace`; or only those of the last adapted block, `laplace_last`, the
paper's last-layer variant) gets a Gaussian posterior N(W_MAP, P^-1) with
block-diagonal (per-matrix) Kronecker-factored precision
    P = G (x) A + tau I      (row-major vec(W); as an operator: dW -> G dW A + tau dW),
    A = (1/R) sum_rows a a^T     (layer inputs, over all R contributing token rows),
    G = sum_{rows, c} g_c g_c^T  (output gradients of v_c . z over the training set),
the KFAC-expand approximation of the generalised Gauss-Newton of the summed
training NLL: z are the per-choice logits, H = diag(p) - p p^T their softmax
Hessian, and v_c = sqrt(p_c) (e_c - p) its exact square-root columns
(H = sum_c v_c v_c^T), so the GGN is exact, not a Monte-Carlo Fisher. Rows
that receive no gradient (padding) are left out of A. For one contributing
row per matrix, G (x) A equals the dense GGN block (tested).

A factor larger than `max_dense_factor` rows (G of lm_head's lora_B is vocabulary x vocabulary: 49,152^2
doubles, 19 GB, on SmolLM2) is kept as its `factor_rank` leading eigenpairs instead, updated as the
gradient rows arrive (`LowRankCurvature`, an incremental truncated eigendecomposition; the Laplace-LoRA
authors' `bayesian_lora` package also offers low-rank factors for LLM-sized layers). The directions it
drops carry no curvature: the posterior there is the prior, N(0, 1/tau), wider than the full factor's,
never narrower.

The prior precision tau is chosen on the held-out validation set: the value
of a log grid (`prior_grid`, default 10^-2 .. 10^4) with the lowest validation
NLL of the sampled predictive (`tune_samples` seeded draws).

Predictive: sampled. Each predictive sample holds one draw
dW = Q_G [E / sqrt(l_G l_A^T + tau)] Q_A^T (eigendecompositions of G and A,
E standard normal) added to every W for all forwards inside its context. The
paper's main results use the linearised (GLM) predictive; it needs a
Jacobian per test question and a method-specific evaluation, which the shared
path forbids, so only the sampled predictive is offered here.

Why not `laplace-torch`: its Kronecker backends (ASDL, curvlinops) take a
model mapping a tensor X to a fixed number of class logits and a (X, y)
loader; our per-choice logits come from the shared scorer (cloze scoring runs
one sequence per choice, padded choices are -inf), and the package adds the
backpack/asdl/curvlinops stack to the dependencies. The compact KFAC here is
~100 lines on torch hooks and is tested against a dense GGN.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager

import torch
from accelerate.utils import tqdm
from torch import nn

from bayeslora.methods.base import PREDICTIVE_SAMPLES, register_method
from bayeslora.methods.map import PostHocMAP


@dataclass
class KroneckerPosterior:
    """N(W_MAP, (G (x) A + tau I)^-1) for one weight matrix `name`, via the eigendecompositions of A and G."""

    name: str
    weight: nn.Parameter
    eig_a: torch.Tensor
    basis_a: torch.Tensor
    eig_g: torch.Tensor
    basis_g: torch.Tensor

    #: what a run folder saves of a posterior (W_MAP is the adapter itself)
    FITTED: ClassVar[tuple[str, ...]] = ("eig_a", "basis_a", "eig_g", "basis_g")

    @classmethod
    def from_factors(cls, name: str, weight: nn.Parameter, a: torch.Tensor,
                     g: "torch.Tensor | LowRankCurvature") -> "KroneckerPosterior":
        eig_a, basis_a = torch.linalg.eigh(a.double().cpu())  # kept on the CPU: small, and the sampler's generator is there
        eig_g, basis_g = (g.eig, g.basis) if isinstance(g, LowRankCurvature) else torch.linalg.eigh(g.double().cpu())
        return cls(name, weight, eig_a.clamp_min(0), basis_a, eig_g.clamp_min(0).cpu(), basis_g.cpu())

    def sample(self, prior_precision: float, generator: torch.Generator) -> torch.Tensor:
        """One draw of W - W_MAP, shape of W."""
        precision = torch.outer(self.eig_g, self.eig_a) + prior_precision
        noise = torch.randn(precision.shape, generator=generator, dtype=torch.float64)
        draw = self.basis_g @ (noise / precision.sqrt()) @ self.basis_a.T
        rows, kept = self.basis_g.shape
        if kept < rows:  # a low-rank G: its complement has no curvature, so the prior alone there
            rest = torch.randn(rows, self.basis_a.shape[0], generator=generator, dtype=torch.float64)
            draw += (rest - self.basis_g @ (self.basis_g.T @ rest)) / math.sqrt(prior_precision)
        return draw.to(self.weight.dtype)


@dataclass
class LowRankCurvature:
    """The `rank` leading eigenpairs (eig, basis columns) of a sum of outer products sum_i g_i g_i^T, kept as
    rows arrive: each `add` appends the new rows to basis * sqrt(eig), M = [basis sqrt(eig), rows^T], whose
    M M^T is the running sum exactly, and truncates the eigendecomposition of M M^T (from the small M^T M)."""

    basis: torch.Tensor  # (dim, <= rank)
    eig: torch.Tensor  # (<= rank,), descending
    rank: int

    @classmethod
    def empty(cls, dim: int, rank: int, device: torch.device | None = None) -> "LowRankCurvature":
        return cls(torch.zeros(dim, 0, dtype=torch.float64, device=device),
                   torch.zeros(0, dtype=torch.float64, device=device), rank)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows[(rows != 0).any(-1)].double()
        if not len(rows):
            return
        stacked = torch.cat([self.basis * self.eig.sqrt(), rows.T], 1)
        eig, vectors = torch.linalg.eigh(stacked.T @ stacked)  # ascending; M M^T has the same nonzero eigenvalues
        eig, vectors = eig.flip(0)[: self.rank], vectors.flip(1)[:, : self.rank]
        keep = eig > eig[0] * 1e-12  # numerically zero directions: no curvature, left to the prior
        self.eig, self.basis = eig[keep], stacked @ vectors[:, keep] / eig[keep].sqrt()

    def __mul__(self, scale: float) -> "LowRankCurvature":
        return LowRankCurvature(self.basis, self.eig * scale, self.rank)


def lora_weight_modules(model: nn.Module, last_block_only: bool = False) -> dict[str, nn.Linear]:
    """The active adapter's lora_A / lora_B linear maps, by name; optionally only those of the last adapted block."""
    modules = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "active_adapters"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    modules[f"{name}.lora_A.{adapter}"] = module.lora_A[adapter]
                    modules[f"{name}.lora_B.{adapter}"] = module.lora_B[adapter]
    if last_block_only and modules:
        modules = {name: module for name, module in modules.items() if _block(name) == _block(list(modules)[-1])}
    return modules


def _block(name: str) -> str:
    """`...layers.<k>.` for a decoder-block module, else the module path itself (e.g. lm_head)."""
    match = re.search(r"^(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name.rsplit(".lora_", 1)[0]


def kfac_factors(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    batches: list[Any],
    choice_logits: Callable[[nn.Module, Any], torch.Tensor],
    max_dense_factor: int = 4096,
    factor_rank: int = 256,
) -> dict[str, tuple[torch.Tensor, "torch.Tensor | LowRankCurvature"]]:
    """{name: (A, G)} of the GGN of the summed NLL over `batches` (KFAC-expand, see module docstring); a G of more
    than `max_dense_factor` rows is a `LowRankCurvature` of rank `factor_rank`."""
    def output_factor(m: nn.Linear) -> "torch.Tensor | LowRankCurvature":
        if m.out_features > max_dense_factor:
            return LowRankCurvature.empty(m.out_features, factor_rank, m.weight.device)
        return torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=m.weight.device)

    sums = {name: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device),
                   output_factor(m), 0]
            for name, m in modules.items()}
    # per module, one entry per forward call of the batch (cloze scoring calls the model twice: prompt, then
    # the choices on the prompt's cache): the call's input rows and which rows received any gradient
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    reached: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def forward_hook(name: str):
        def hook(module, args, output):
            rows = args[0].detach().reshape(-1, module.in_features).double()
            inputs[name].append(rows)
            reached[name].append(torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device))
            output.register_hook(backward_hook(name, len(inputs[name]) - 1))
        return hook

    def backward_hook(name: str, call: int):
        def hook(grad):
            g = grad.detach().reshape(-1, grad.shape[-1]).double()
            if isinstance(sums[name][1], LowRankCurvature):
                sums[name][1].add(g)
            else:
                sums[name][1] += g.T @ g
            reached[name][call] |= (g != 0).any(-1)
        return hook

    handles = [module.register_forward_hook(forward_hook(name)) for name, module in modules.items()]
    params = [module.weight for module in modules.values()]
    try:
        for batch in tqdm(batches, desc="laplace curvature", unit="batch"):
            logits = choice_logits(model, batch).float()
            present = torch.isfinite(logits)
            logits = logits.masked_fill(~present, 0.0)  # padded choices: p = 0, so they carry no curvature
            probs = torch.softmax(logits.masked_fill(~present, float("-inf")), -1).detach()
            for choice in range(logits.shape[1]):
                onehot = torch.zeros_like(probs)
                onehot[:, choice] = 1.0
                root_column = probs[:, choice : choice + 1].sqrt() * (onehot - probs)
                torch.autograd.grad((root_column * logits).sum(), params, retain_graph=True, allow_unused=True)
            for name in modules:
                for rows, used in zip(inputs[name], reached[name]):
                    sums[name][0] += rows[used].T @ rows[used]
                    sums[name][2] += int(used.sum())
                inputs[name].clear()
                reached[name].clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (a / max(count, 1), g) for name, (a, g, count) in sums.items()}


@contextlib.contextmanager
def held_sample(posteriors: list[KroneckerPosterior], prior_precision: float, seed: int) -> Iterator[None]:
    """Inside: every LoRA matrix at one posterior draw W_MAP + dW (seeded); restored exactly on exit."""
    generator = torch.Generator().manual_seed(seed)
    saved = [posterior.weight.detach().clone() for posterior in posteriors]
    with torch.no_grad():
        for posterior in posteriors:
            posterior.weight.add_(posterior.sample(prior_precision, generator).to(posterior.weight.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for posterior, weight in zip(posteriors, saved):
                posterior.weight.copy_(weight)


@register_method
class Laplace(PostHocMAP):
    name: ClassVar[str] = "laplace"
    default_samples: ClassVar[int] = PREDICTIVE_SAMPLES
    last_block_only: ClassVar[bool] = False

    def __init__(
        self,
        prior_grid: tuple[float, ...] = tuple(10.0**k for k in range(-2, 5)),
        tune_samples: int = 4,
        curvature_batches: int | None = None,
        max_dense_factor: int = 4096,
        factor_rank: int = 256,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        for option, value in (("max_dense_factor", max_dense_factor), ("factor_rank", factor_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}")
        self.prior_grid = tuple(prior_grid)
        self.tune_samples = tune_samples
        self.curvature_batches = curvature_batches
        self.max_dense_factor = max_dense_factor
        self.factor_rank = factor_rank
        self.posteriors: list[KroneckerPosterior] = []
        self.prior_precision = math.nan

    def after_training(self, model, validation_batches, choice_logits, train_batches=None) -> None:
        if not train_batches:
            raise ValueError("laplace needs the training batches for its curvature (after_training(train_batches=...))")
        model.eval()
        used = train_batches[: self.curvature_batches] if self.curvature_batches else train_batches
        modules = lora_weight_modules(model, self.last_block_only)
        factors = kfac_factors(model, modules, used, choice_logits, self.max_dense_factor, self.factor_rank)
        data_scale = len(train_batches) / len(used)  # G is a sum over the training set
        self.posteriors = [
            KroneckerPosterior.from_factors(name, modules[name].weight, a, g * data_scale) for name, (a, g) in factors.items()
        ]
        grid = tqdm(self.prior_grid, desc="laplace prior search", unit="prior")
        self.prior_precision = min(grid, key=lambda tau: self._validation_nll(model, validation_batches, choice_logits, tau))

    @torch.no_grad()
    def _validation_nll(self, model, batches, choice_logits, prior_precision: float) -> float:
        """Mean NLL of the `tune_samples`-draw predictive (log-mean-exp of log-softmaxes) on `batches`."""
        log_probs = []
        for sample in range(self.tune_samples):
            with held_sample(self.posteriors, prior_precision, seed=sample):
                log_probs.append(torch.cat([self._answer_log_prob(model, batch, choice_logits) for batch in batches]))
        predictive = torch.logsumexp(torch.stack(log_probs), 0) - math.log(self.tune_samples)
        return float(-predictive.mean())

    @staticmethod
    def _answer_log_prob(model, batch, choice_logits) -> torch.Tensor:
        log_softmax = torch.log_softmax(choice_logits(model, batch).float(), -1)
        return log_softmax.gather(1, batch["answers"].to(log_softmax.device).view(-1, 1)).squeeze(1)

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        for sample in range(self.sample_count(n_samples)):
            yield held_sample(self.posteriors, self.prior_precision, seed + sample)

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{p.name}.{part}": getattr(p, part) for p in self.posteriors for part in KroneckerPosterior.FITTED}
        # the order of the matrices is the order of their draws from one seeded generator: kept
        return tensors, {"prior_precision": self.prior_precision, "matrices": [p.name for p in self.posteriors]}

    def load_fitted_state(self, model, tensors, values) -> None:
        modules = lora_weight_modules(model, self.last_block_only)
        names = list(values["matrices"])
        if sorted(names) != sorted(modules):
            unknown = sorted(set(names) ^ set(modules))
            raise ValueError(f"the saved Laplace posterior does not cover this adapter's matrices (first difference: {unknown[0]})")
        self.posteriors = [
            KroneckerPosterior(name, modules[name].weight, *(tensors[f"{name}.{part}"] for part in KroneckerPosterior.FITTED))
            for name in names
        ]
        self.prior_precision = float(values["prior_precision"])


@register_method
class LastLayerLaplace(Laplace):
    """Laplace-LoRA's last-layer variant: the posterior covers only the last adapted block's LoRA matrices."""

    name: ClassVar[str] = "laplace_last"
    last_block_only: ClassVar[bool] = True
