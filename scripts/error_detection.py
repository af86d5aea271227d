"""Does a model know when it does not know: how well its uncertainty ranks its wrong answers above its right
ones (`bayeslora.metrics.error_detection_auroc`), by the predictive's confidence and by the draws' disagreement.

    python scripts/error_detection.py docs/results/calibration-smollm2/grid/runs/arc_easy/*/seed-*/predictions.jsonl

Each argument is an evaluation folder (one holding predictions.jsonl) or a predictions.jsonl file. Folders
named seed-<s> under the same parent (a compare grid's units of one method) are one row, mean ± standard
deviation over the seeds; any other evaluation is a row of its own. Two uncertainties per question:
1 - max_c p_c (the predictive's own confidence; calibration methods such as temperature scaling hardly
change this ranking) and the mutual information between the answer and the draw (what only a sampling
method has; "-" where every question's is 0, as for a deterministic model). Calibration (ECE) asks whether
the confidences are right on average; this asks whether the uncertain answers are the wrong ones.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from bayeslora.metrics import error_detection_auroc


def aurocs(path: Path) -> tuple[int, float, float | None]:
    """(questions, AUROC of 1 - confidence, AUROC of the mutual information or None) of one predictions.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    wrong = torch.tensor([row["predicted"] != row["gold"] for row in rows])
    confidence = torch.tensor([max(row["probabilities"]) for row in rows])
    information = torch.tensor([row["mutual_information"] for row in rows])
    by_information = error_detection_auroc(information, wrong) if information.any() else None
    return len(rows), error_detection_auroc(1 - confidence, wrong), by_information


def mean_and_spread(values: list[float | None]) -> str:
    if any(value is None for value in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    tensor = torch.tensor(values, dtype=torch.float64)
    return f"{tensor.mean():.3f} ± {tensor.std():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluations", nargs="+", type=Path, help="evaluation folders or predictions.jsonl files")
    args = parser.parse_args()
    groups: dict[str, list[tuple[int, float, float | None]]] = defaultdict(list)
    for evaluation in args.evaluations:
        path = evaluation / "predictions.jsonl" if evaluation.is_dir() else evaluation
        if not path.is_file():
            parser.error(f"{path} does not exist: give an evaluation folder or its predictions.jsonl")
        unit = path.parent
        groups[str(unit.parent) if unit.name.startswith("seed-") else str(unit)].append(aurocs(path))
    print("| evaluation | seeds | questions | AUROC by 1 - confidence | AUROC by mutual information |")
    print("|---|---:|---:|---:|---:|")
    for name, values in groups.items():
        questions = sorted({count for count, _, _ in values})
        print(f"| {name} | {len(values)} | {', '.join(map(str, questions))} | "
              f"{mean_and_spread([value for _, value, _ in values])} | {mean_and_spread([value for _, _, value in values])} |")


if __name__ == "__main__":
    main()
