"""`bayeslora inspect RUN`: is the posterior of a saved run doing anything?

Reads what a `train` run wrote (train_log.jsonl, training.json, results.json) and
prints, at a few steps through training, the scale parameters (lambda and the
inducing sd), the KL per training example split into its inducing and
conditional parts, the relative update ||Delta W|| / ||W|| per target module and
the share of a weight draw's variance that comes from q(U) per Bayesian factor;
then the validation history (NLL, mutual information, draw spread) and the
evaluation's mutual information on wrong and right answers. The last line is a
verdict: whether the draws disagree at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bayeslora.diagnostics import MI_FLOAT_FLOOR
from bayeslora.errors import UsageError

SNAPSHOTS = 5  # steps shown: first, last and evenly spaced between


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory written by `bayeslora train`")


def read_run(directory: Path) -> tuple[list[dict], dict, dict | None]:
    """(per-step log records, training summary, evaluation results or None); one-line errors."""
    log_path = directory / "train_log.jsonl"
    if not log_path.is_file():
        raise UsageError(f"{directory} is not a training run: no train_log.jsonl")
    records = []
    for number, line in enumerate(log_path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UsageError(f"{log_path}:{number}: not a JSON record (an interrupted write? resume the run)") from None
    if not records:
        raise UsageError(f"{log_path} holds no steps yet")

    def optional_json(name: str) -> dict | None:
        path = directory / name
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except json.JSONDecodeError:
            raise UsageError(f"{path} is not valid JSON") from None

    return records, optional_json("training.json") or {}, optional_json("results.json")


def _snapshots(records: list[dict]) -> list[dict]:
    if len(records) <= SNAPSHOTS:
        return records
    picks = sorted({round(i * (len(records) - 1) / (SNAPSHOTS - 1)) for i in range(SNAPSHOTS)})
    return [records[i] for i in picks]


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def training_table(records: list[dict]) -> Table:
    shown = _snapshots(records)
    table = Table(title="posterior during training")
    table.add_column("quantity")
    for record in shown:
        table.add_column(f"step {record['step']}", justify="right")
    rows = [("NLL (nats)", "nll"), ("KL / example, inducing", "kl_inducing_per_example"),
            ("KL / example, conditional", "kl_conditional_per_example"), ("lambda mean", "lambda_mean"),
            ("lambda max", "lambda_max"), ("inducing sd mean", "sd_mean"), ("inducing sd max", "sd_max")]
    if any("noise_scale_min" in record for record in shown):
        rows += [("noise scale min", "noise_scale_min"), ("noise scale max", "noise_scale_max")]
    for label, key in rows:
        table.add_row(label, *(_number(record.get(key)) for record in shown))
    # per target module, and per Bayesian factor: one row per name found in the shown records
    for label, key in (("||dW|| / ||W||", "relative_update"), ("draw variance from q(U)", "inducing_variance_share")):
        for name in sorted({name for record in shown for name in record.get(key, {})}):
            table.add_row(f"{label}, {name}", *(_number(record.get(key, {}).get(name)) for record in shown))
    return table


def validation_table(history: list[dict]) -> Table:
    table = Table(title="validation")
    for column in ("epoch", "step", "NLL (nats)", "MI (nats)", "draw spread"):
        table.add_column(column, justify="right")
    for entry in history:
        table.add_row(str(entry.get("epoch")), str(entry.get("step")), _number(entry.get("validation_nll")),
                      _number(entry.get("mutual_information")), _number(entry.get("draw_spread")))
    return table


def verdict(records: list[dict], history: list[dict], results: dict | None) -> str:
    """One line: do the draws disagree, judged on the evaluation if there is one, else the last validation."""
    source = results if results is not None and results.get("mutual_information") is not None else (history[-1] if history else None)
    if source is None or source.get("mutual_information") is None:
        return "no validation or evaluation with several draws yet: nothing to judge the draws by"
    mi = source["mutual_information"]
    where = "evaluation" if source is results else "last validation"
    last = records[-1]
    if mi < MI_FLOAT_FLOOR:
        return (f"the posterior is a point: {where} mutual information {mi:.1e} nats is at the float floor "
                f"(lambda mean {_number(last.get('lambda_mean'))}, inducing sd mean {_number(last.get('sd_mean'))})")
    wrong, right = source.get("mutual_information_wrong"), source.get("mutual_information_right")
    split = f"; wrong answers {_number(wrong)}, right answers {_number(right)}" if wrong is not None and right is not None else ""
    return f"the draws disagree: {where} mutual information {mi:.3g} nats{split}"


def run(args: argparse.Namespace) -> int:
    directory = Path(args.run)
    records, training, results = read_run(directory)
    console = Console()
    console.print(f"run {directory}: {records[-1]['step']} optimizer steps logged")
    if any("lambda_mean" in record for record in records):
        console.print(training_table(records))
    history = [entry for member in training.get("members", []) for entry in member.get("validation_history", [])]
    if history:
        console.print(validation_table(history))
    if results is not None:
        console.print(f"evaluation: {results['n_examples']} questions, {results['n_samples']} draws: "
                      f"ACC {results['accuracy_percent']:.1f}%  ECE {results['ece_percent']:.1f}%  NLL {results['nll']:.3f}")
    print(verdict(records, history, results))  # one line, never wrapped
    return 0
