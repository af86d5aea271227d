"""What a trained Bayesian-LoRA's learned posterior adds over its prior: the run evaluated with the posterior
of some Bayesian target modules replaced by their prior, everything else (the other modules, the plain
LoRA targets, the evaluation protocol) as trained.

    python scripts/prior_control.py RUN --modules lm_head --output DIR -- --model smollm2-135m --task arc_easy \
        --scoring cloze --limit 500 --samples 4 --seed 1 --batch-size 16

RUN is a `bayeslora train` run folder (or a saved Bayesian-LoRA adapter). The prior is set exactly, in the
adapter's own parameters: inducing mean 0 and sd 1 (whitened, so q(U) = p(U)), the flow's output layer 0
(the identity flow), lambda 1 and any noise scales per row and column 1 (the conditional equals the
prior's). The KL of those factors to their prior is then 0, and each of their draws is
W ~ N(0, sigma_p^2 I), whatever the data said. An adapter
whose conditional prior scale was learned (`learn_prior_lambda`, empirical Bayes) keeps its lambda: it is
then the prior's own hyperparameter, fitted to the data, and only q(U) is set to p(U). The adapter is
written to DIR/adapter and the arguments after `--` go to `bayeslora evaluate --adapter DIR/adapter
--output DIR/evaluation`. If the control's numbers equal the run's, the data taught those modules'
posteriors nothing the evaluation can see.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bayeslora.cli import main as bayeslora_main
from bayeslora.inducing import inverse_softplus


def prior_values(name: str, value: torch.Tensor, learned_lambda: bool) -> torch.Tensor | None:
    """The value of an inducing-factor tensor that makes its posterior the prior; None for other tensors
    (and for lambda when the prior's conditional scale was learned with it: lambda is then the prior's)."""
    if name.endswith(".u_mean") or ".flow.output_layer." in name:
        return torch.zeros_like(value)
    noise_scale = name.endswith((".noise_row_raw", ".noise_col_raw"))  # per row and column, prior 1
    if name.endswith(".u_sd_raw") or noise_scale or (name.endswith(".lambda_raw") and not learned_lambda):
        return torch.full_like(value, inverse_softplus(1.0))
    return None


def to_prior(tensors: dict[str, torch.Tensor], config: dict, modules: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """`tensors` (a Bayesian-LoRA adapter's state) with the factors of `modules` at their prior, and how many
    tensors changed. A module is a name component of the tensor's key (`lm_head`, `q_proj`)."""
    bayesian = config.get("bayesian_modules") or []
    unknown = sorted(set(modules) - set(bayesian))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not Bayesian modules of this adapter "
                         f"(its Bayesian modules: {', '.join(bayesian) or 'none'})")
    learned_lambda = bool(config.get("learn_prior_lambda"))
    # the values the prior needs (sd 1, and lambda 1 unless lambda is the prior's own) must be within the caps
    caps = ("max_sd_u",) if learned_lambda else ("max_sd_u", "max_lambda")
    if any(config[cap] < 1 for cap in caps):
        raise ValueError(f"the prior (1 for {', '.join(caps)}) is outside this adapter's caps "
                         f"({', '.join(f'{cap} {config[cap]}' for cap in caps)})")
    changed, replaced = dict(tensors), 0
    for name, value in tensors.items():
        if set(name.split(".")) & set(modules) and (prior := prior_values(name, value, learned_lambda)) is not None:
            changed[name], replaced = prior, replaced + 1
    return changed, replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `bayeslora train` run folder or a saved Bayesian-LoRA adapter")
    parser.add_argument("--modules", required=True, help="comma-separated Bayesian modules to set to their prior")
    parser.add_argument("--output", required=True, type=Path, help="folder for the adapter and its evaluation")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, evaluate_options = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: `bayeslora evaluate`'s
    config_file, weights_file = args.run / "adapter_config.json", args.run / "adapter_model.safetensors"
    if not (config_file.is_file() and weights_file.is_file()):
        parser.error(f"{args.run} holds no adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    try:
        tensors, replaced = to_prior(load_file(weights_file), config, [m.strip() for m in args.modules.split(",")])
    except ValueError as error:
        parser.error(str(error))
    adapter = args.output / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_file, adapter / "adapter_config.json")
    save_file(tensors, adapter / "adapter_model.safetensors")
    print(f"{replaced} tensors of {args.modules} set to the prior in {adapter}")
    raise SystemExit(bayeslora_main(["evaluate", "--adapter", str(adapter), "--output", str(args.output / "evaluation"),
                                     *evaluate_options]))


if __name__ == "__main__":
    main()
