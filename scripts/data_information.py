"""How much a run's training answers can tell its Bayesian factors' inducing means, against their prior.

    python scripts/data_information.py RUN [--at init|trained] [--draws K] [--limit N] [--json FILE]

RUN is a `bayeslora train` run folder (a `compare` unit is one) of a Bayesian-LoRA run: its run.json gives
the model, the adapter settings, the seed and the training questions. `--at init` rebuilds the adapter as
the run initialised it (the same seed), `--at trained` loads the adapter the run saved. For each Bayesian
factor it prints the Fisher information F of the training answers about the whitened inducing mean,
summed over the training questions (`bayeslora.diagnostics.inducing_data_precision`), at the posterior's
deterministic point or, with `--draws K`, averaged over K posterior draws (the curvature a Gaussian
variational posterior's precision settles at), in units of the prior's precision, which is 1 per entry:
tr F (mean and largest over layers), the largest single entry F_ii, the largest eigenvalue e of F, and the
posterior sd along that eigenvector under a Laplace approximation, 1 / sqrt(1 + e) (the prior's is 1),
and, to set against it, the mean and least of q0's standard deviations (what the run learned).
Where e is far below 1 no direction of the inducing weights is informed by the data, and the ELBO's
posterior over them can only be the prior.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from accelerate.utils import set_seed
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from bayeslora.checkpoint import RUN_FILE
from bayeslora.diagnostics import inducing_data_precision
from bayeslora.experiment import load_questions, load_trained_adapter, run_scorer
from bayeslora.files import write_atomically
from bayeslora.methods import get_method
from bayeslora.models import load_model
from bayeslora.saved_files import read_json_object
from bayeslora.train_settings import make_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `bayeslora train` run folder of a Bayesian-LoRA run")
    parser.add_argument("--at", choices=("init", "trained"), default="trained",
                        help="the adapter as initialised (rebuilt from the run's seed) or as the run saved it")
    parser.add_argument("--draws", type=int, default=0,
                        help="average over this many posterior draws (seeds 0..K-1); 0: at the deterministic point")
    parser.add_argument("--limit", type=int, default=None, help="only the first N training questions")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.draws < 0:
        parser.error(f"--draws must be 0 or more, got {args.draws}")
    if not (args.run / RUN_FILE).is_file():
        parser.error(f"{args.run} holds no {RUN_FILE}: not a `bayeslora train` run folder")
    settings = make_settings({**read_json_object(args.run / RUN_FILE), "output": str(args.run)})
    if settings.method != "bayeslora":
        parser.error(f"{args.run} is a {settings.method} run; only Bayesian-LoRA runs have inducing weights")
    if args.at == "trained" and not (args.run / "adapter_model.safetensors").is_file():
        parser.error(f"{args.run} holds no saved adapter (a checkout keeps none): run it again, or use --at init")
    if args.json is not None:  # its folder is made before the measurement, not after it
        args.json.parent.mkdir(parents=True, exist_ok=True)
    train, _, _ = load_questions(settings)
    train = train[: args.limit]

    model, tokenizer = load_model(settings.model, **settings.loading())
    set_seed(settings.seed)  # as `bayeslora train` does before building the adapter
    model = get_method(settings.method, **settings.method_options).prepare(model, settings.lora())
    if args.at == "trained":
        load_trained_adapter(model, args.run)
    scorer = run_scorer(tokenizer, settings, model.config)
    precision = inducing_data_precision(model, scorer, tqdm(train, desc="Fisher information", unit="question"),
                                        draws=args.draws)
    point = f"mean over {args.draws} posterior draws" if args.draws else "deterministic point"

    table = Table(title=f"Fisher information of {len(train)} training answers about the inducing means "
                        f"({args.at}, {point}; prior precision 1 per entry)")
    for column in ("factor", "tr F, mean over layers", "tr F, largest", "largest F_ii", "largest eigenvalue",
                   "its Laplace sd", "q0 sd, mean (min)"):
        table.add_column(column, justify="left" if column == "factor" else "right")
    for name, values in precision.items():
        table.add_row(name, f"{values['trace_mean']:.3g}", f"{values['trace_max']:.3g}", f"{values['entry_max']:.3g}",
                      f"{values['eigen_max']:.3g}", f"{1 / math.sqrt(1 + values['eigen_max']):.4f}",
                      f"{values['sd_mean']:.3f} ({values['sd_min']:.3f})")
    Console().print(table)
    if args.json is not None:
        record = {"run": str(args.run), "at": args.at, "n_questions": len(train), "draws": args.draws,
                  "factors": precision}
        write_atomically(args.json, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
