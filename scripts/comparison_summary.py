"""One compact markdown table from a `bayeslora compare` directory's table.json: per method, the
in-distribution ACC / ECE / NLL / MI, the averages under shift, and the training time.

    python scripts/comparison_summary.py docs/results/calibration-smollm2/grid

Cells are mean ± sample std over the seeds a method has finished (the number of seeds is its own
column); "ECE × mle" divides a method's mean ECE by mle's. The full tables, per task, are the
directory's table.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (("accuracy_percent", "ACC (%)", 1), ("ece_percent", "ECE (%)", 1), ("nll", "NLL", 3),
           ("mutual_information", "MI", 3))


def cell(entry: dict | None, digits: int) -> str:
    if entry is None:
        return "–"
    spread = f" ± {entry['std']:.{digits}f}" if entry["n_seeds"] > 1 else ""
    return f"{entry['mean']:.{digits}f}{spread}"


def summary(tables: dict) -> list[str]:
    inside, shifted = tables["in_distribution"], tables.get("out_of_distribution")
    title = "| method | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " | ECE × mle |"
    rule = "|---|---:|" + "---:|" * (len(COLUMNS) + 1)
    if shifted:
        title += " shift: ACC (%) | shift: ECE (%) | shift: NLL |"
        rule += "---:|---:|---:|"
    lines = [title + " training (s) |", rule + "---:|"]
    mle_ece = inside["ece_percent"].get("mle", {}).get("average")
    for method, row in inside["accuracy_percent"].items():
        if "average" not in row:
            continue
        cells = [str(row["average"]["n_seeds"])]
        cells += [cell(inside[key].get(method, {}).get("average"), digits) for key, _, digits in COLUMNS]
        ece = inside["ece_percent"][method]["average"]["mean"]
        cells.append(f"{ece / mle_ece['mean']:.2f}" if mle_ece else "–")
        if shifted:
            cells += [cell(shifted[key].get(method, {}).get("average"), digits) for key, _, digits in COLUMNS[:3]]
        cost = tables.get("cost", {}).get(method)
        cells.append(f"{cost['train_seconds']:.0f}" if cost else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a `bayeslora compare --output` directory")
    args = parser.parse_args()
    path = args.directory / "table.json"
    if not path.is_file():
        parser.error(f"{path} does not exist: run `bayeslora compare --output {args.directory}` first")
    print("\n".join(summary(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
