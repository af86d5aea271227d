"""Is the posterior doing anything? The numbers that answer it, for the training log and `bayeslora inspect`.

Per optimizer step (`posterior_state`):
- `lambda_mean`, `lambda_max`: the conditional noise scale lambda over all Bayesian factors;
- `sd_mean`, `sd_max`: the standard deviations of q0 over all inducing entries;
- `kl_inducing`, `kl_conditional`: the model's KL in nats, split into the part over the
  inducing matrices (KL(q(V) || N(0, I)), flow included) and the conditional part
  sum (d_out d_in / 2)(lambda^2 - 1 - 2 log lambda) (with noise scales, `inducing.kl_parts`'s);
  the training log divides both by N_train;
- `relative_update`: per target module name (`q_proj`, ...), the mean over layers of
  ||Delta W|| / ||W|| (Frobenius norms), Delta W = scaling * B A of the posterior-mean factors
  (of the plain factors on non-Bayesian targets): how far the adapter moved the base weight;
- `noise_scale_min`, `noise_scale_max` (with `noise_scales` only): the range over all entries of W of
  the conditional noise's scale lambda r_i c_j (1 is the prior's): where the data shrank the draws' spread;
- `inducing_variance_share`: per Bayesian factor (`q_proj.lora_A`, ...), the mean over layers of the
  share of a weight draw's variance tr Cov(W) that comes from q(U) rather than from the conditional
  noise (`inducing.draw_variance_parts`). Near 0, the learned posterior over the inducing weights
  cannot show in the predictions: the draws' spread is the conditional noise, set by lambda alone.

Per validation (`draw_disagreement`): the mean mutual information between the answer and the
draw (nats) and the mean spread of the choice log-probabilities over draws (see `predictive`).
Both are zero for a posterior that has collapsed to a point.

On demand (`inducing_data_precision`, `scripts/data_information.py`): how much the training answers can
tell each factor's inducing mean at all, as the Fisher information against the prior's precision. Where
it is far below 1 the posterior over the inducing weights stays at the prior, however it is optimised.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from bayeslora.adapter import bayesian_factors, factor_groups, sampling
from bayeslora.inducing import MEAN, SAMPLE, InducingFactor, draw_variance_parts, draw_weights, kl_parts
from bayeslora.kl_guard import MissingKLWarning

#: a mean mutual information below this is float rounding, not disagreement between draws (nats)
MI_FLOAT_FLOOR = 1e-6


@torch.no_grad()
def posterior_state(model: nn.Module) -> dict[str, Any]:
    """Scale parameters, KL parts (nats) and relative update sizes of a Bayesian-LoRA model."""
    factors = list(bayesian_factors(model))
    if not factors:
        raise ValueError("the model has no Bayesian factors (was it built with get_bayeslora_model?)")
    lambdas = torch.stack([factor.lam for factor in factors])
    sds = torch.cat([factor.u_sd.flatten() for factor in factors])
    inducing, conditional = zip(*(kl_parts(group) for group in factor_groups(model)))
    state = {
        "lambda_mean": lambdas.mean().item(),
        "lambda_max": lambdas.max().item(),
        "sd_mean": sds.mean().item(),
        "sd_max": sds.max().item(),
        "kl_inducing": torch.cat(inducing).sum().item(),
        "kl_conditional": torch.cat(conditional).sum().item(),
        "relative_update": relative_updates(model),
        "inducing_variance_share": inducing_variance_shares(model),
    }
    if any(factor.noise_scales for factor in factors):
        # the conditional noise's sd of one entry over the prior's, lambda r_i c_j: its range over all entries
        state["noise_scale_min"] = min((f.lam * f.noise_row.min() * f.noise_col.min()).item() for f in factors)
        state["noise_scale_max"] = max((f.lam * f.noise_row.max() * f.noise_col.max()).item() for f in factors)
    return state


def _factor_names(model: nn.Module) -> dict[int, str]:
    """`<target>.lora_A` / `.lora_B` for each Bayesian factor of `model`, keyed by the factor's id."""
    return {id(module): ".".join(name.split(".")[-3:-1])  # ...q_proj.lora_A.<adapter>
            for name, module in model.named_modules() if isinstance(module, InducingFactor)}


@torch.no_grad()
def inducing_variance_shares(model: nn.Module) -> dict[str, float]:
    """Per Bayesian factor (`<target>.lora_A` / `.lora_B`): mean over layers of the share of a draw's variance
    from q(U). A fixed generator makes the flow's Monte Carlo estimate repeatable from step to step."""
    names = _factor_names(model)
    generator = torch.Generator(device=next(bayesian_factors(model)).u_mean.device).manual_seed(0)
    shares: dict[str, list[float]] = defaultdict(list)
    for group in factor_groups(model):
        inducing, conditional = draw_variance_parts(group, generator=generator)
        for factor, share in zip(group, (inducing / (inducing + conditional)).tolist()):
            shares[names[id(factor)]].append(share)
    return {name: sum(values) / len(values) for name, values in shares.items()}


def inducing_data_precision(
    model: nn.Module, scorer, questions, draws: int = 0, seed: int = 0
) -> dict[str, dict[str, float]]:
    """How much the answers to `questions` can tell each Bayesian factor's inducing mean, in units of the prior.

    The prior of the whitened inducing matrix M is N(0, I): precision 1 per entry. What the data add is the
    Fisher information of the answer given the question, summed over the questions. With choice logits z_n,
    p_n = softmax(z_n) and J_n = dz_n / dM, its diagonal is

        F_ii = sum_n sum_c p_nc (J_nci - sum_c' p_nc' J_nc'i)^2,

    the diagonal of the generalised Gauss-Newton matrix F = sum_n J_n^T (diag p_n - p_n p_n^T) J_n of the NLL
    (one backward pass per answer choice), accumulated whole (M has m_r m_c entries). With `draws` = 0 it is
    taken at the posterior's deterministic point (sampling mode "mean"); with `draws` = K it is the average
    over K posterior draws (draw k from `sampling`'s seed `seed + k`, the same weights for every question),
    the expected curvature that a Gaussian variational posterior's precision settles at (prior precision +
    E_q[GGN]), where each factor's partner is as large as its draws, not as its mean. Entry i's posterior
    precision is then about 1 + F_ii, and along an eigenvector of F with eigenvalue e it is 1 + e: a factor
    whose largest eigenvalue is << 1 has no direction the data inform, and stays at the prior whatever the
    optimiser does.

    Returns, per factor name (`q_proj.lora_A`, ...), over the layers: `trace_mean` and `trace_max` of tr F,
    `entry_max`, the largest F_ii, and `eigen_max`, the largest eigenvalue of F; beside them what q0 holds,
    `sd_mean` and `sd_min` of its standard deviations over M's entries (the prior's are 1), to set what
    the posterior learned against what the data can tell.
    """
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 0:
        raise ValueError(f"draws must be a non-negative integer, got {draws!r}")
    factors = list(bayesian_factors(model))
    if not factors:
        raise ValueError("the model has no Bayesian factors (was it built with get_bayeslora_model?)")
    means = [factor.u_mean for factor in factors]
    fisher = [torch.zeros(mean.numel(), mean.numel(), dtype=torch.float64, device=mean.device) for mean in means]
    points = [(MEAN, None)] if draws == 0 else [(SAMPLE, seed + k) for k in range(draws)]
    for question in questions:
        for mode, draw_seed in points:
            # a fresh graph per question and point: its draw is held for the question's passes
            with sampling(model, mode, seed=draw_seed, hold=True):
                logits = scorer.choice_logits(model, scorer.collate([question]))[0]
            logits = logits[torch.isfinite(logits)]
            probs = logits.softmax(-1).detach().double()
            with warnings.catch_warnings():  # these gradients measure the likelihood; nothing is trained without the KL
                warnings.simplefilter("ignore", MissingKLWarning)
                jacobian = [torch.stack(rows).double() for rows in zip(*(
                    torch.autograd.grad(logit, means, retain_graph=c < len(logits) - 1) for c, logit in enumerate(logits)))]
            for total, rows in zip(fisher, jacobian):  # rows: [choices, *M's shape]
                centred = rows.flatten(1) - probs @ rows.flatten(1)
                total += centred.T @ (probs[:, None] * centred) / len(points)
    names = _factor_names(model)
    per_factor: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for factor, total in zip(factors, fisher):
        per_factor[names[id(factor)]].append((total, factor.u_sd.detach().flatten()))
    summary = {}
    for name, layers in per_factor.items():
        totals, sds = [total for total, _ in layers], torch.cat([sd for _, sd in layers])
        summary[name] = {"trace_mean": sum(t.trace().item() for t in totals) / len(totals),
                         "trace_max": max(t.trace().item() for t in totals),
                         "entry_max": max(t.diagonal().max().item() for t in totals),
                         "eigen_max": max(torch.linalg.eigvalsh(t)[-1].item() for t in totals),
                         "sd_mean": sds.mean().item(), "sd_min": sds.min().item()}
    return summary


@torch.no_grad()
def relative_updates(model: nn.Module) -> dict[str, float]:
    """Per target module name: mean over layers of ||scaling * B A|| / ||W|| for the active adapter."""
    mean_weights = {}
    for group in factor_groups(model):
        mean_weights.update(zip(map(id, group), draw_weights(group, MEAN)))
    ratios: dict[str, list[float]] = defaultdict(list)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a, b = module.lora_A[adapter], module.lora_B[adapter]
            a = mean_weights[id(a)] if isinstance(a, InducingFactor) else a.weight
            b = mean_weights[id(b)] if isinstance(b, InducingFactor) else b.weight
            # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products instead of the d_out x d_in update
            gram = (b.float().mT @ b.float()) * (a.float() @ a.float().mT)
            update = module.scaling[adapter] * gram.sum().clamp(min=0).sqrt()
            ratios[name.rsplit(".", 1)[-1]].append((update / module.get_base_layer().weight.float().norm()).item())
    return {name: sum(values) / len(values) for name, values in ratios.items()}


def draw_disagreement(predictions) -> dict[str, float | None]:
    """Means over questions of the mutual information (nats), also over wrongly and rightly answered
    questions (None where there are none), and of the draw spread of the choice log-probabilities."""
    mi = predictions.mutual_information
    wrong = predictions.probs.argmax(-1) != predictions.answers

    def mean(values: torch.Tensor) -> float | None:
        return values.mean().item() if len(values) else None

    return {
        "mutual_information": mean(mi),
        "mutual_information_wrong": mean(mi[wrong]),
        "mutual_information_right": mean(mi[~wrong]),
        "draw_spread": mean(predictions.draw_spread),
    }


def collapse_message(mutual_information: float, state: dict[str, Any]) -> str | None:
    """A one-line warning when the draws no longer disagree (MI at the float floor), else None."""
    if mutual_information >= MI_FLOAT_FLOOR:
        return None
    return (f"the posterior has collapsed to a point: validation mutual information {mutual_information:.1e} nats "
            f"(lambda mean {state['lambda_mean']:.2g}, max {state['lambda_max']:.2g}; inducing sd mean "
            f"{state['sd_mean']:.2g}, max {state['sd_max']:.2g}); see docs/method.md on the scale settings")
