"""`bayeslora compare`: every (task, method, seed) on the shared path, then the comparison tables.

    bayeslora compare --model smollm2-135m --tasks arc_easy,openbookqa --methods mle,map,bayeslora \\
        --seeds 1,2,3 --output runs/compare
    bayeslora compare --preset smoke --output /tmp/smoke        # all methods, tiny fixture, ~1-2 minutes

One *unit* is one (training task, method, seed): prepare the method's adapter
(`methods`), train it with the one training loop (`train.fit`, which also runs
the method's post-hoc fit on the validation role), then evaluate it with the
one evaluation path (`evaluate`) on the test role of its task and, for the
`--ood-from` task, on each `--ood-tasks` test set without retraining. Each
unit runs in its own process (its peak memory is then its own) and writes
DIR/runs/<task>/<method>/seed-<seed>/:
    train/                     the training run (checkpoints: an interrupted unit resumes)
    eval/<eval task>/          results.json, predictions.jsonl, reliability.png
    cost.json                  written last: the unit is finished
A rerun skips finished units, so a crash or an interrupt loses no finished
run; a rerun with different settings in the same DIR is refused.

Then, from every finished unit of the grid:
    DIR/table.md, DIR/table.json   ACC and ECE (percent), NLL (nats), mean +- std over seeds,
                                   per task and averaged over tasks, best of each column in bold;
                                   the OoD table in the same format; the cost table
    DIR/reliability/<task>/<method>.png   predictions pooled over seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bayeslora.errors import UsageError

PROTOCOL_NOTE = "train on the train role, select and post-hoc fit on the validation role, report on the test role"
#: posterior / predictive samples of every sampling method unless --samples says otherwise (the paper's N)
COMMON_SAMPLES = 4
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smoke"
#: tasks backed by the committed smoke fixture: role -> JSONL file
FIXTURE_TASKS = {
    "smoke_arith": {role: FIXTURE / f"arith_{role}.jsonl" for role in ("train", "validation", "test")},
    "smoke_shift": {"test": FIXTURE / "shift_test.jsonl"},
}
ALL_METHODS = ("mle", "map", "mcdropout", "ensemble", "blob", "laplace", "laplace_last", "temperature", "tfb", "bayeslora")
PAPER_TASKS = ("winogrande_s", "arc_challenge", "arc_easy", "winogrande_m", "openbookqa", "boolq")
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": str(FIXTURE / "model"),
        "tasks": ["smoke_arith"],
        "methods": list(ALL_METHODS),
        "seeds": [1],
        "samples": 2,
        "ood_from": "smoke_arith",
        "ood_tasks": ["smoke_shift"],
        "train": {"max_steps": 4, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-2, "precision": "fp32",
                  "zero_shot": False, "r": 4, "lora_alpha": 8.0},
        "method_options": {"laplace": {"prior_grid": [1.0, 100.0], "tune_samples": 2},
                           "laplace_last": {"prior_grid": [1.0, 100.0], "tune_samples": 2},
                           "tfb": {"search_steps": 4, "search_samples": 2}},
    },
    "paper": {
        "tasks": list(PAPER_TASKS),
        "methods": list(ALL_METHODS),
        "seeds": [1, 2, 3],
        "ood_from": "openbookqa",
        "ood_tasks": ["arc_challenge", "arc_easy", "mmlu_chem", "mmlu_phys"],
        # the released LLaMA-2-7B settings (METHOD.md section 4); lr is per task there, 5e-4 here
        "train": {"epochs": 6, "batch_size": 6, "lr": 5e-4, "lr_schedule": "multistep", "lr_milestones": [2, 4]},
    },
}
METRICS = (("accuracy_percent", "ACC (%)", max), ("ece_percent", "ECE (%)", min), ("nll", "NLL (nats)", min))


# ----------------------------------------------------------------------------------------------- the grid


@dataclass
class Grid:
    model: str
    scoring: str
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    samples: int
    ood_from: str | None
    ood_tasks: list[str]
    train: dict[str, Any]  # TrainSettings overrides
    method_options: dict[str, dict[str, Any]]
    limit_validation: int | None
    output: Path = field(compare=False)

    def training_tasks(self) -> list[str]:
        return self.tasks + ([self.ood_from] if self.ood_from and self.ood_from not in self.tasks else [])

    def eval_tasks(self, task: str) -> list[str]:
        return ([task] if task in self.tasks else []) + (self.ood_tasks if task == self.ood_from else [])

    def identity(self) -> dict[str, Any]:
        """What every unit of DIR shares; units may be added (tasks, methods, seeds), settings not changed."""
        return {"model": self.model, "scoring": self.scoring, "samples": self.samples, "train": self.train,
                "method_options": self.method_options, "limit_validation": self.limit_validation}


def _names(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--{what} is empty")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"--{what} lists {', '.join(duplicates)} more than once")
    return names


def _seeds(text: str | None) -> list[int] | None:
    names = _names(text, "seeds")
    if names is None:
        return None
    try:
        return [int(name) for name in names]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _check_tasks(names: list[str], flag: str, role: str) -> None:
    from bayeslora.tasks import TASKS

    valid = list(TASKS) + list(FIXTURE_TASKS)
    for name in names:
        if name not in valid:
            raise UsageError(f"unknown task {name!r} in {flag}; valid tasks: {', '.join(valid)}")
        roles = FIXTURE_TASKS[name] if name in FIXTURE_TASKS else TASKS[name].roles
        if role not in roles:
            raise UsageError(f"task {name!r} in {flag} has no {role!r} split (its splits: {', '.join(roles)})")


def _read_yaml_mapping(path: str, flag: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"cannot read {flag} file {path}: {error.strerror}") from None
    except yaml.YAMLError:
        raise UsageError(f"{flag} file {path} is not valid YAML") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{flag} file {path} must be a mapping")
    return loaded


def resolve_grid(args: argparse.Namespace) -> Grid:
    """The grid the flags and the preset describe, checked; nothing is written."""
    from bayeslora.methods import METHODS
    from bayeslora.train_settings import TrainSettings

    preset = PRESETS[args.preset] if args.preset else {}
    tasks = _names(args.tasks, "tasks") or preset.get("tasks")
    methods = _names(args.methods, "methods") or preset.get("methods")
    seeds = _seeds(args.seeds) or preset.get("seeds") or [1]
    ood_from = args.ood_from or (preset.get("ood_from") if args.ood_tasks is None else None)
    ood_tasks = _names(args.ood_tasks, "ood-tasks") or (preset.get("ood_tasks", []) if args.ood_from is None else [])
    if not tasks:
        raise UsageError("no tasks: give --tasks (or a --preset)")
    if not methods:
        raise UsageError("no methods: give --methods (or a --preset)")
    if bool(ood_from) != bool(ood_tasks):
        raise UsageError("--ood-from and --ood-tasks go together: give both or neither")
    for name in methods:
        if name not in METHODS:
            raise UsageError(f"unknown method {name!r} in --methods; valid methods: {', '.join(sorted(METHODS))}")
    _check_tasks(tasks, "--tasks", "train")
    _check_tasks(tasks, "--tasks", "test")
    if ood_from:
        _check_tasks([ood_from], "--ood-from", "train")
        _check_tasks(ood_tasks, "--ood-tasks", "test")
    samples = args.samples if args.samples is not None else preset.get("samples", COMMON_SAMPLES)
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")

    train = dict(preset.get("train", {}))
    if args.train_config:
        train.update(_read_yaml_mapping(args.train_config, "--train-config"))
    train.update({name: value for name in ("epochs", "max_steps", "batch_size", "lr", "limit_train", "limit_eval",
                                           "eval_batch_size") if (value := getattr(args, name)) is not None})
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    owned = {"model", "task", "task_file", "eval_file", "method", "method_options", "scoring", "output", "seed", "samples"}
    for name in train:
        if name not in known or name in owned:
            raise UsageError(f"--train-config: {name!r} is not a training setting compare passes on")
    method_options = dict(preset.get("method_options", {}))
    if args.method_options:
        method_options.update(_read_yaml_mapping(args.method_options, "--method-options"))
    for name, options in method_options.items():
        if name not in METHODS or not isinstance(options, dict):
            raise UsageError(f"--method-options: {name!r} must be a method name mapping to its options")
    if args.limit_validation is not None and args.limit_validation < 1:
        raise UsageError(f"--limit-validation must be at least 1, got {args.limit_validation}")
    model = args.model or preset.get("model") or "smollm2-135m"
    return Grid(model, args.scoring, tasks, methods, seeds, samples, ood_from, ood_tasks or [], train,
                method_options, args.limit_validation, Path(args.output))


# ----------------------------------------------------------------------------------------------- one unit


def unit_dir(grid: Grid, task: str, method: str, seed: int) -> Path:
    return grid.output / "runs" / task / method / f"seed-{seed}"


def unit_finished(grid: Grid, task: str, method: str, seed: int) -> bool:
    directory = unit_dir(grid, task, method, seed)
    return (directory / "cost.json").is_file() and all(
        (directory / "eval" / name / "results.json").is_file() for name in grid.eval_tasks(task)
    )


def load_questions(task: str, role: str, limit: int | None = None) -> list:
    from bayeslora.tasks import load_task, load_task_file

    if task in FIXTURE_TASKS:
        return load_task_file(FIXTURE_TASKS[task][role])[:limit]
    return load_task(task, role, limit=limit)


def _write_json_atomically(path: Path, value: Any) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def trainable_parameters(model, method) -> int:
    """Parameters the loop trains, summed over an ensemble's members."""
    total = 0
    for member in method.members(model):
        with member:
            total += sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total


def method_options_for(grid: Grid, name: str, batch_size: int) -> dict[str, Any]:
    options = dict(grid.method_options.get(name, {}))
    if name == "blob":  # BLoB's KL re-weighting runs over the epoch's minibatches: it needs the loop's batch size
        options.setdefault("batch_size", batch_size)
    return options


def run_unit(grid: Grid, task: str, method_name: str, seed: int) -> None:
    """Train (or resume) one unit, evaluate what is missing, then write cost.json."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from bayeslora.evaluate import evaluate, write_outputs
    from bayeslora.methods import get_method
    from bayeslora.models import load_model
    from bayeslora.scoring import Scorer
    from bayeslora.train import fit
    from bayeslora.train_settings import TrainSettings

    directory = unit_dir(grid, task, method_name, seed)
    # samples: the per-epoch model selection uses the same N as the reported evaluation
    settings = dataclasses.replace(TrainSettings(), **grid.train, seed=seed, method=method_name, scoring=grid.scoring,
                                   samples=grid.samples)
    method = get_method(method_name, **method_options_for(grid, method_name, settings.batch_size))
    model, tokenizer = load_model(grid.model)
    scorer = Scorer(tokenizer, grid.scoring)
    set_seed(seed)  # the adapter initialisation depends on the seed
    lora = {"r": settings.r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
            "target_modules": list(settings.target_modules)}
    model = method.prepare(model, lora)
    n_trainable = trainable_parameters(model, method)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_questions = load_questions(task, "train", settings.limit_train)
    validation_questions = load_questions(task, "validation", grid.limit_validation)
    train_dir = directory / "train"
    start = time.perf_counter()
    fit(model, scorer, method, train_questions, validation_questions, settings, train_dir, accelerator,
        resume=(train_dir / "checkpoints").is_dir())
    train_seconds = time.perf_counter() - start

    evaluations = {}
    n_samples = grid.samples if method.is_stochastic else 1
    for eval_task in grid.eval_tasks(task):
        target = directory / "eval" / eval_task
        questions = load_questions(eval_task, "test", settings.limit_eval)
        results, predictions = evaluate(model, tokenizer, questions, grid.scoring, method, n_samples, seed,
                                        settings.eval_batch_size)
        results.update(task=eval_task, split="test", train_task=task, model=grid.model, limit_eval=settings.limit_eval)
        write_outputs(target, results, questions, predictions)
        evaluations[eval_task] = results["seconds"] / results["n_examples"]

    if accelerator.device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(), "peak CUDA memory allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory of the unit's process"
    previous = json.loads((directory / "cost.json").read_text()) if (directory / "cost.json").is_file() else {}
    cost = {
        # a rerun that only added evaluations keeps the first, complete training time
        "train_seconds": previous.get("train_seconds", train_seconds),
        "peak_memory_bytes": max(peak, previous.get("peak_memory_bytes", 0)),
        "peak_memory_kind": peak_kind,
        "trainable_parameters": n_trainable,
        "eval_seconds_per_question": {**previous.get("eval_seconds_per_question", {}), **evaluations},
        # the method's settings and post-hoc fits (temperature T, Laplace prior precision, TFB sigma, ...)
        "method_values": {k: v for k, v in vars(method).items() if isinstance(v, (int, float, str)) and not k.startswith("_")},
        "n_train": len(train_questions),
        "n_validation": len(validation_questions),
        "device": str(accelerator.device),
    }
    _write_json_atomically(directory / "cost.json", cost)


def _unit_process(grid: Grid, task: str, method: str, seed: int) -> None:
    (unit_dir(grid, task, method, seed) / "error.txt").unlink(missing_ok=True)
    try:
        run_unit(grid, task, method, seed)
    except BaseException as error:  # recorded for the parent's one-line report, then re-raised (exit code != 0)
        directory = unit_dir(grid, task, method, seed)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
        raise


# ----------------------------------------------------------------------------------------------- tables


def _mean_std(values: list[float]) -> dict[str, float | int]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "n_seeds": len(values)}


def collect(grid: Grid, train_task_of: dict[str, str], eval_tasks: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {method: {eval task | "average": mean/std over seeds}}} from the finished units."""
    table: dict[str, dict[str, dict[str, Any]]] = {key: {} for key, _, _ in METRICS}
    for method in grid.methods:
        per_seed: dict[int, dict[str, dict[str, float]]] = {}
        for seed in grid.seeds:
            for eval_task in eval_tasks:
                path = unit_dir(grid, train_task_of[eval_task], method, seed) / "eval" / eval_task / "results.json"
                if path.is_file():
                    per_seed.setdefault(seed, {})[eval_task] = json.loads(path.read_text())
        for key, _, _ in METRICS:
            row = {}
            for eval_task in eval_tasks:
                values = [results[eval_task][key] for results in per_seed.values() if eval_task in results]
                if values:
                    row[eval_task] = _mean_std(values)
            complete = [sum(r[t][key] for t in eval_tasks) / len(eval_tasks) for r in per_seed.values() if len(r) == len(eval_tasks)]
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
        digits = 3 if key == "nll" else 1
        lines += [f"**{title}** ({'higher' if better is max else 'lower'} is better)", "",
                  "| method | " + " | ".join(columns + ["average"]) + " |",
                  "|---|" + "---:|" * (len(columns) + 1)]
        best = {}
        for column in columns + ["average"]:
            means = {m: table[key][m][column]["mean"] for m in methods if column in table[key].get(m, {})}
            if means:
                best[column] = better(means, key=means.get)
        for method in methods:
            row = table[key].get(method, {})
            cells = [_cell(row.get(c), digits, best.get(c) == method) for c in columns + ["average"]]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def cost_table(grid: Grid) -> dict[str, dict[str, float]]:
    """Per method, means over its finished units: training seconds, peak memory, trainable parameters, eval s/question."""
    costs = {}
    for method in grid.methods:
        units = [json.loads(p.read_text()) for task in grid.training_tasks() for seed in grid.seeds
                 if (p := unit_dir(grid, task, method, seed) / "cost.json").is_file()]
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


def header(grid: Grid) -> list[str]:
    any_results = next(iter(sorted(grid.output.glob("runs/*/*/*/eval/*/results.json"))), None)
    versions = json.loads(any_results.read_text()) if any_results else {}
    budget = ", ".join(f"{k}={v}" for k, v in sorted(grid.train.items())) or "training defaults"
    return [
        f"- model: `{grid.model}`; scoring: {grid.scoring}; protocol: {versions.get('protocol_version', '?')} "
        f"(prompt {versions.get('prompt_version', '?')}): {PROTOCOL_NOTE}",
        f"- predictive samples: N = {grid.samples} for every sampling method (ensemble: one per member); "
        f"deterministic methods: 1",
        f"- seeds: {', '.join(map(str, grid.seeds))} (mean ± std over seeds; std needs 2 or more)",
        f"- training settings: {budget}; validation limit: {grid.limit_validation or 'full validation role'}",
    ]


def write_reliability_diagrams(grid: Grid, train_task_of: dict[str, str]) -> None:
    import torch

    from bayeslora.plots import save_reliability_diagram

    for eval_task, train_task in train_task_of.items():
        for method in grid.methods:
            rows = []
            for seed in grid.seeds:
                path = unit_dir(grid, train_task, method, seed) / "eval" / eval_task / "predictions.jsonl"
                if path.is_file():
                    rows += [json.loads(line) for line in path.read_text().splitlines()]
            if not rows:
                continue
            width = max(len(row["probabilities"]) for row in rows)
            probs = torch.tensor([row["probabilities"] + [0.0] * (width - len(row["probabilities"])) for row in rows])
            labels = torch.tensor([row["gold"] for row in rows])
            target = grid.output / "reliability" / (eval_task if train_task == eval_task else f"{train_task}-to-{eval_task}")
            target.mkdir(parents=True, exist_ok=True)
            title = f"{method} on {eval_task} (trained on {train_task}), {len(grid.seeds)} seed(s) pooled"
            save_reliability_diagram(probs, labels, target / f"{method}.png", title)


def write_tables(grid: Grid) -> dict[str, Any]:
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
              "the post-hoc fit (Laplace, temperature, TFB) and the per-epoch validation.", "",
              *cost_markdown(tables["cost"]), ""]
    _write_json_atomically(grid.output / "table.json", tables)
    staging = grid.output / ".table.md.tmp"
    staging.write_text("\n".join(lines) + "\n")
    os.replace(staging, grid.output / "table.md")
    write_reliability_diagrams(grid, {**in_distribution, **ood})
    return tables


# ----------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="smoke: all methods on the committed tiny fixture; "
                        "paper: the paper's six tasks and OoD protocol (flags given override the preset)")
    parser.add_argument("--model", help="Hub id, local folder or embedded model name (default smollm2-135m)")
    parser.add_argument("--tasks", help="comma-separated registry task names")
    parser.add_argument("--methods", help="comma-separated method names (bayeslora.methods)")
    parser.add_argument("--seeds", help="comma-separated integer seeds (default 1)")
    parser.add_argument("--samples", type=int, help=f"predictive samples of every sampling method (default {COMMON_SAMPLES})")
    parser.add_argument("--scoring", choices=["letter", "cloze"], default="cloze", help="how choices are scored")
    parser.add_argument("--ood-from", help="task whose adapters are also evaluated on --ood-tasks, without retraining")
    parser.add_argument("--ood-tasks", help="comma-separated tasks (test role) for the out-of-distribution table")
    parser.add_argument("--output", required=True, help="comparison directory (reused: finished units are skipped)")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--max-steps", type=int, help="stop each training after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, help="questions per optimizer step")
    parser.add_argument("--lr", type=float, help="AdamW learning rate")
    parser.add_argument("--limit-train", type=int, help="use the first K training questions")
    parser.add_argument("--limit-validation", type=int, help="use the first K validation questions (selection, post-hoc fits)")
    parser.add_argument("--limit-eval", type=int, help="evaluate on the first K test questions (not the protocol)")
    parser.add_argument("--eval-batch-size", type=int, help="questions per evaluation forward")
    parser.add_argument("--train-config", help="YAML of further training settings (keys of `bayeslora train`)")
    parser.add_argument("--method-options", help="YAML: method name -> options of its constructor")


def check_output(grid: Grid) -> None:
    """Refuse a DIR that holds something else, or a comparison with other settings."""
    if grid.output.exists() and not grid.output.is_dir():
        raise UsageError(f"--output {grid.output} exists and is not a directory")
    grid_file = grid.output / "grid.json"
    if grid_file.is_file():
        previous = json.loads(grid_file.read_text())["identity"]
        current = json.loads(json.dumps(grid.identity()))
        for key in sorted(set(previous) | set(current)):
            if previous.get(key) != current.get(key):
                raise UsageError(f"--output {grid.output} holds a comparison with {key} = {previous.get(key)!r}, "
                                 f"not {current.get(key)!r}; choose another directory")
    elif grid.output.is_dir() and any(grid.output.iterdir()):
        raise UsageError(f"--output {grid.output} is not empty and holds no comparison; choose another directory")


def run(args: argparse.Namespace) -> int:
    grid = resolve_grid(args)
    check_output(grid)
    grid.output.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(grid.output / "grid.json", {"identity": grid.identity()})
    units = [(task, method, seed) for task in grid.training_tasks() for method in grid.methods for seed in grid.seeds]
    # fork where the platform has it: the child starts without re-importing torch (seconds per unit);
    # the parent has run no torch computation, so there are no worker threads to lose in the fork
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    failures = []
    for index, (task, method, seed) in enumerate(units, 1):
        if unit_finished(grid, task, method, seed):
            print(f"[{index}/{len(units)}] {task} / {method} / seed {seed}: finished earlier, reused", flush=True)
            continue
        print(f"[{index}/{len(units)}] {task} / {method} / seed {seed}", flush=True)
        process = context.Process(target=_unit_process, args=(grid, task, method, seed))
        process.start()
        try:
            process.join()
        except KeyboardInterrupt:
            process.terminate()
            process.join()
            print("interrupted: finished units are kept; rerun the same command to continue", flush=True)
            return 130
        if process.exitcode != 0:
            error = unit_dir(grid, task, method, seed) / "error.txt"
            failures.append(f"{task} / {method} / seed {seed}: " + (error.read_text().strip() if error.is_file() else f"exit code {process.exitcode}"))
    write_tables(grid)
    print(f"wrote {grid.output / 'table.md'} and {grid.output / 'table.json'}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0
