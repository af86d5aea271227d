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


def question_sets(questions: int, resamples: int, seed: int) -> list[torch.Tensor]:
    """All questions, then `resamples` resampled sets; the same sets for every evaluation of a seed."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.arange(questions)] + [torch.randint(questions, (questions,), generator=generator)
                                        for _ in range(resamples)]


def summarise(values: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """{metric: (value on all questions, standard deviation over the resampled sets)} of `question_sets` values."""
    return {key: (values[0][key], torch.tensor([value[key] for value in values[1:]], dtype=torch.float64).std().item())
            for key in values[0]}


def bootstrap(probs: torch.Tensor, labels: torch.Tensor, resamples: int, seed: int,
              reference: torch.Tensor | None = None) -> list[dict[str, tuple[float, float]]]:
    """The metrics of `probs` with their bootstrap standard deviations; with `reference` (probabilities for
    the same questions) also those of the difference metric(probs) - metric(reference), each metric computed
    once per question set."""
    sets = question_sets(len(labels), resamples, seed)
    own = [all_metrics(probs[index], labels[index]) for index in sets]
    if reference is None:
        return [summarise(own)]
    baseline = [all_metrics(reference[index], labels[index]) for index in sets]
    return [summarise(own), summarise([{key: a[key] - b[key] for key in a} for a, b in zip(own, baseline)])]


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
        if reference is not None and (not torch.equal(labels, reference[1]) or probs.shape != reference[0].shape):
            parser.error(f"{evaluation} and --reference {args.reference} are not scored on the same questions")
        statistics = bootstrap(probs, labels, args.resamples, args.seed, reference[0] if reference else None)
        cells = [f"{stats[key][0]:{sign}.{digits}f} ± {stats[key][1]:.{digits}f}"  # differences carry their sign
                 for sign, stats in zip(("", "+"), statistics) for key, _, digits in SHOWN]
        print(f"| {evaluation} | {len(labels)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
