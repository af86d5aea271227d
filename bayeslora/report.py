"""The comparison's report, from the finished units of a `compare` grid: tables, cost, reliability diagrams.

    DIR/table.md, DIR/table.json   ACC and ECE (percent), NLL and MI (nats), mean +- std over seeds,
                                   per task and averaged over tasks, best of each column in bold;
                                   the OoD table in the same format; the cost table
    DIR/reliability/<task>/<method>.png   predictions pooled over seeds

Each unit's cost.json (`write_cost`) holds its training time, peak memory,
trainable parameters and evaluation time per question.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

from bayeslora.files import write_atomically
from bayeslora.methods.base import PREDICTIVE_SAMPLES

PROTOCOL_NOTE = "train on the train role, select and post-hoc fit on the validation role, report on the test role"
#: (results key, title, which is better: max, min, or None when neither is)
METRICS = (("accuracy_percent", "ACC (%)", max), ("ece_percent", "ECE (%)", min), ("nll", "NLL (nats)", min),
           ("mutual_information", "MI (nats, mean over questions: how much the draws disagree)", None))
DIGITS = {"nll": 3, "mutual_information": 4}


def write_cost(directory: Path, run, evaluations: dict[str, dict[str, Any]]) -> None:
    """cost.json of a unit from its `experiment.Experiment` and its evaluation results; written last."""
    import torch

    if torch.cuda.is_available():
        peak, peak_kind = torch.cuda.max_memory_allocated(), "peak CUDA memory allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory of the unit's process"
    previous = json.loads((directory / "cost.json").read_text()) if (directory / "cost.json").is_file() else {}
    cost = {
        # a rerun that only added evaluations keeps the first, complete training time
        "train_seconds": previous.get("train_seconds", run.train_seconds),
        "peak_memory_bytes": max(peak, previous.get("peak_memory_bytes", 0)),
        "peak_memory_kind": peak_kind,
        "trainable_parameters": run.trainable_parameters,
        "eval_seconds_per_question": {**previous.get("eval_seconds_per_question", {}),
                                      **{name: r["seconds"] / r["n_examples"] for name, r in evaluations.items()}},
        # the method's settings and post-hoc fits (temperature T, Laplace prior precision, TFB sigma, ...)
        "method_values": {k: v for k, v in vars(run.method).items() if isinstance(v, (int, float, str)) and not k.startswith("_")},
        "n_train": run.n_train,
        "n_validation": run.n_validation,
        "device": run.device,
    }
    write_atomically(directory / "cost.json", json.dumps(cost, indent=2) + "\n")


def _mean_std(values: list[float]) -> dict[str, float | int]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "n_seeds": len(values)}


def collect(grid, train_task_of: dict[str, str], eval_tasks: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {method: {eval task | "average": mean/std over seeds}}} from the finished units."""
    table: dict[str, dict[str, dict[str, Any]]] = {key: {} for key, _, _ in METRICS}
    for method in grid.methods:
        per_seed: dict[int, dict[str, dict[str, float]]] = {}
        for seed in grid.seeds:
            for eval_task in eval_tasks:
                path = grid.results_dir(train_task_of[eval_task], eval_task, method, seed) / "results.json"
                if path.is_file():
                    per_seed.setdefault(seed, {})[eval_task] = json.loads(path.read_text())
        for key, _, _ in METRICS:
            row = {}
            for eval_task in eval_tasks:
                values = [results[eval_task][key] for results in per_seed.values()
                          if results.get(eval_task, {}).get(key) is not None]
                if values:
                    row[eval_task] = _mean_std(values)
            complete = [sum(r[t][key] for t in eval_tasks) / len(eval_tasks) for r in per_seed.values()
                        if all(r.get(t, {}).get(key) is not None for t in eval_tasks)]
            if complete:
                row["average"] = _mean_std(complete)
            table[key][method] = row
    return table


def _cell(entry: dict[str, Any] | None, digits: int, best: bool) -> str:
    if entry is None:
        return "–"
    text = f"{entry['mean']:.{digits}f}" + (f" ± {entry['std']:.{digits}f}" if entry["n_seeds"] > 1 else "")
    return f"**{text}**" if best else text


def markdown_blocks(table: dict[str, dict[str, dict[str, Any]]], methods: list[str], columns: list[str]) -> list[str]:
    lines = []
    for key, title, better in METRICS:
        digits = DIGITS.get(key, 1)
        ranking = "" if better is None else f" ({'higher' if better is max else 'lower'} is better)"
        lines += [f"**{title}**{ranking}", "",
                  "| method | " + " | ".join(columns + ["average"]) + " |",
                  "|---|" + "---:|" * (len(columns) + 1)]
        best = {}
        for column in columns + ["average"]:
            means = {m: table[key][m][column]["mean"] for m in methods if column in table[key].get(m, {})}
            if means and better is not None:
                best[column] = better(means, key=means.get)
        for method in methods:
            row = table[key].get(method, {})
            cells = [_cell(row.get(c), digits, best.get(c) == method) for c in columns + ["average"]]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def cost_table(grid) -> dict[str, dict[str, float]]:
    """Per method, means over its finished units: training seconds, peak memory, trainable parameters, eval s/question."""
    costs = {}
    for method in grid.methods:
        units = [json.loads(p.read_text()) for task in grid.training_tasks() for seed in grid.seeds
                 if (p := grid.unit_dir(task, method, seed) / "cost.json").is_file()]
        if not units:
            continue
        per_question = [s for u in units for s in u["eval_seconds_per_question"].values()]
        costs[method] = {
            "train_seconds": sum(u["train_seconds"] for u in units) / len(units),
            "peak_memory_mib": sum(u["peak_memory_bytes"] for u in units) / len(units) / 2**20,
            "trainable_parameters": sum(u["trainable_parameters"] for u in units) / len(units),
            "eval_ms_per_question": 1000 * sum(per_question) / len(per_question),
            "units": len(units),
        }
    return costs


def cost_markdown(costs: dict[str, dict[str, float]]) -> list[str]:
    reference = costs.get("mle")
    columns = (("train_seconds", "training time (s)", ".1f"), ("peak_memory_mib", "peak memory (MiB)", ".0f"),
               ("trainable_parameters", "trainable parameters", ",.0f"), ("eval_ms_per_question", "evaluation (ms / question)", ".1f"))
    lines = ["| method | " + " | ".join(f"{title} | × mle" for _, title, _ in columns) + " |",
             "|---|" + "---:|---:|" * len(columns)]
    for method, cost in costs.items():
        cells = []
        for key, _, fmt in columns:
            ratio = f"{cost[key] / reference[key]:.2f}" if reference and reference[key] else "–"
            cells += [format(cost[key], fmt), ratio]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def header(grid) -> list[str]:
    any_results = next(iter(sorted(grid.output.glob("runs/*/*/*/results.json"))), None)
    versions = json.loads(any_results.read_text()) if any_results else {}
    shown = {"scoring", "samples", "limit_validation"}
    budget = ", ".join(f"{k}={v}" for k, v in sorted(grid.train.items()) if k not in shown) or "training defaults"
    samples = grid.train.get("samples")
    draws = (f"N = {samples} for every sampling method" if samples is not None
             else f"N = each method's default ({PREDICTIVE_SAMPLES} for sampling methods)")
    return [
        f"- model: `{grid.model}`; scoring: {grid.train['scoring']}; protocol: {versions.get('protocol_version', '?')} "
        f"(prompt {versions.get('prompt_version', '?')}): {PROTOCOL_NOTE}",
        f"- predictive samples: {draws} (ensemble: one per member); deterministic methods: 1",
        f"- seeds: {', '.join(map(str, grid.seeds))} (mean ± std over seeds; std needs 2 or more)",
        f"- training settings: {budget}; validation limit: {grid.train.get('limit_validation') or 'full validation role'}",
    ]


def write_reliability_diagrams(grid, train_task_of: dict[str, str]) -> None:
    from bayeslora.evaluate import read_predictions
    from bayeslora.plots import save_reliability_diagram

    for eval_task, train_task in train_task_of.items():
        for method in grid.methods:
            paths = [path for seed in grid.seeds
                     if (path := grid.results_dir(train_task, eval_task, method, seed) / "predictions.jsonl").is_file()]
            if not paths:
                continue
            probs, labels = read_predictions(paths)
            target = grid.output / "reliability" / (eval_task if train_task == eval_task else f"{train_task}-to-{eval_task}")
            target.mkdir(parents=True, exist_ok=True)
            title = f"{method} on {eval_task} (trained on {train_task}), {len(paths)} seed(s) pooled"
            save_reliability_diagram(probs, labels, target / f"{method}.png", title)


def write_tables(grid) -> dict[str, Any]:
    in_distribution = {task: task for task in grid.tasks}
    ood = {task: grid.ood_from for task in grid.ood_tasks}
    tables = {"header": header(grid), "in_distribution": collect(grid, in_distribution, grid.tasks)}
    lines = ["# Method comparison", "", *tables["header"], "", "## In distribution", "",
             *markdown_blocks(tables["in_distribution"], grid.methods, grid.tasks)]
    if grid.ood_from:
        tables["out_of_distribution"] = {"trained_on": grid.ood_from, **collect(grid, ood, grid.ood_tasks)}
        lines += [f"## Out of distribution (trained on {grid.ood_from}, no retraining)", "",
                  *markdown_blocks(tables["out_of_distribution"], grid.methods, grid.ood_tasks)]
    tables["cost"] = cost_table(grid)
    lines += ["## Cost", "", "Means over each method's finished units; ratios to `mle`. Training time includes "
              "the post-hoc fit (Laplace, temperature, TFB) and the validation; a post-hoc method that reuses its "
              "base method's adapter (map) counts only its fit.", "",
              *cost_markdown(tables["cost"]), ""]
    write_atomically(grid.output / "table.json", json.dumps(tables, indent=2) + "\n")
    write_atomically(grid.output / "table.md", "\n".join(lines) + "\n")
    write_reliability_diagrams(grid, {**in_distribution, **ood})
    return tables
