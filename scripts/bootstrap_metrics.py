"""How much of a metric is the choice of test questions: the protocol's metrics of one evaluation with
their bootstrap standard errors over questions (resampled with replacement).

    python scripts/bootstrap_metrics.py docs/results/calibration-smollm2/grid/runs/arc_easy/*/seed-1

    python scripts/bootstrap_metrics.py --reference .../mle/seed-1 .../bayeslora/seed-1

Each argument is an evaluation folder (one holding predictions.jsonl) or a predictions.jsonl file.
With one seed per method this is the only error bar there is. `--reference` adds, per evaluation,
its difference to the reference evaluation of the same questions, with the standard error of that
difference over the same resampled question sets (a paired bootstrap: it keeps whatever correlation
the two evaluations have on the same questions, which two separate error bars ignore).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bayeslora.evaluate import read_predictions
from bayeslora.metrics import all_metrics

#: not NLL: predictions.jsonl rounds probabilities to 6 decimals, so a gold answer's can read 0 there
#: (results.json has the exact NLL)
SHOWN = (("accuracy_percent", "ACC (%)", 1), ("ece_percent", "ECE (%)", 1), ("brier", "Brier", 3))


def bootstrap(probs: torch.Tensor, labels: torch.Tensor, resamples: int, seed: int,
              reference: torch.Tensor | None = None) -> dict[str, tuple[float, float]]:
    """{metric: (value on all questions, standard deviation over `resamples` resampled question sets)};
    with `reference` (probabilities for the same questions), of the difference metric(probs) - metric(reference)."""
    def value(index: torch.Tensor) -> dict[str, float]:
        metrics = all_metrics(probs[index], labels[index])
        if reference is None:
            return metrics
        baseline = all_metrics(reference[index], labels[index])
        return {key: metrics[key] - baseline[key] for key in metrics}

    generator = torch.Generator().manual_seed(seed)  # the same question sets for every evaluation
    draws = [value(torch.randint(len(labels), (len(labels),), generator=generator)) for _ in range(resamples)]
    full = value(torch.arange(len(labels)))
    return {key: (full[key], torch.tensor([draw[key] for draw in draws], dtype=torch.float64).std().item())
            for key in full}


def predictions_of(parser: argparse.ArgumentParser, evaluation: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = evaluation / "predictions.jsonl" if evaluation.is_dir() else evaluation
    if not path.is_file():
        parser.error(f"{path} does not exist: give an evaluation folder or its predictions.jsonl")
    return read_predictions([path])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluation folders or predictions.jsonl files")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    parser.add_argument("--reference", type=Path, help="also show each evaluation's difference to this one")
    args = parser.parse_args()
    reference = predictions_of(parser, args.reference) if args.reference else None
    titles = [title for _, title, _ in SHOWN] + [f"{title} - reference" for _, title, _ in SHOWN if reference]
    print("| evaluation | questions | " + " | ".join(titles) + " |")
    print("|---|---:|" + "---:|" * len(titles))
    for evaluation in args.evaluations:
        probs, labels = predictions_of(parser, evaluation)
        statistics = [bootstrap(probs, labels, args.resamples, args.seed)]
        if reference is not None:
            if not torch.equal(labels, reference[1]) or probs.shape != reference[0].shape:
                parser.error(f"{evaluation} and --reference {args.reference} are not scored on the same questions")
            statistics.append(bootstrap(probs, labels, args.resamples, args.seed, reference[0]))
        cells = [f"{stats[key][0]:{sign}.{digits}f} ± {stats[key][1]:.{digits}f}"  # differences carry their sign
                 for sign, stats in zip(("", "+"), statistics) for key, _, digits in SHOWN]
        print(f"| {evaluation} | {len(labels)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
