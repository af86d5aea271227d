"""The one evaluation path, shared by every method, and the `bayeslora evaluate` command.

    bayeslora evaluate --model smollm2-135m --task arc_easy --scoring cloze --output runs/zero-shot

questions (`tasks`) -> per-choice logits (`scoring`) -> predictive mixture over
the method's draws (`predictive`) -> metrics -> DIR/results.json,
DIR/predictions.jsonl and DIR/reliability.png. Every file is written to a
temporary name and renamed into place, results.json last: a failed or
interrupted run leaves no partial results.json behind.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

import bayeslora
from bayeslora.errors import UsageError, check_count
from bayeslora.files import write_atomically
from bayeslora.methods import Method, get_method
from bayeslora.diagnostics import draw_disagreement
from bayeslora.metrics import all_metrics
from bayeslora.models import DEFAULT_MODEL, load_model, load_tokenizer
from bayeslora.plots import save_reliability_diagram
from bayeslora.predictive import Predictions, predict
from bayeslora.scoring import MODES, NORMALIZATIONS, Scorer
from bayeslora.tasks import EVALUATION_ROLE, ROLES, TASKS, Question, load_task, load_task_file

PROTOCOL_VERSION = "bayeslora-eval-v1"


def method_for(model: nn.Module, name: str | None = None) -> Method | None:
    """The named method; else the Bayesian-LoRA predictive for a Bayesian model; else None (deterministic)."""
    if name is not None:
        return get_method(name)
    return get_method("bayeslora") if bayeslora.is_bayesian(model) else None


def attach_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """A saved adapter on top of `model`: Bayesian-LoRA when its adapter_config says so, else plain peft."""
    from peft import PeftModel

    config_path = Path(directory) / "adapter_config.json"
    if not config_path.is_file():
        raise UsageError(f"adapter folder {str(directory)!r} has no adapter_config.json")
    if "bayesian_modules" in json.loads(config_path.read_text()):
        return bayeslora.load_bayeslora_model(model, directory).eval()
    return PeftModel.from_pretrained(model, directory).eval()


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[Question],
    scoring: str = "letter",
    method: Method | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    normalization: str = "mean",
    progress: bool = False,
) -> tuple[dict[str, Any], Predictions]:
    """Metrics of `model` on `questions` and the per-question predictions.

    `n_samples` None: the method's own default (1 without a method);
    `seconds` is the wall-clock time of scoring, model loading excluded.
    """
    scorer = Scorer(tokenizer, scoring, normalization=normalization)
    start = time.perf_counter()
    predictions = predict(model, scorer, questions, method, n_samples, seed, batch_size, progress=progress)
    seconds = time.perf_counter() - start
    results = {
        "protocol_version": PROTOCOL_VERSION,
        "prompt_version": scorer.prompt_version,
        "scoring": scoring,
        "method": method.name if method is not None else None,
        "n_samples": predictions.n_samples,
        "seed": seed,
        "n_examples": len(questions),
        **all_metrics(predictions.probs, predictions.answers),
        **draw_disagreement(predictions),
        "seconds": seconds,
        "units": {
            "accuracy_percent": "percent",
            "ece_percent": "percent, 15 equal-width confidence bins",
            "mce_percent": "percent, 15 equal-width confidence bins",
            "nll": "nats per question",
            "brier": "sum over choices, per question",
            "mutual_information": "nats per question (mean; _wrong / _right: over wrongly / rightly answered ones)",
            "draw_spread": "standard deviation over draws of a choice's log-probability, mean over choices and questions",
            "seconds": "wall-clock seconds of scoring",
        },
    }
    return results, predictions


def prediction_records(questions: Sequence[Question], predictions: Predictions) -> Iterator[dict[str, Any]]:
    for row, question in enumerate(questions):
        probabilities = predictions.probs[row, : len(question.choices)]
        yield {
            "id": question.id,
            "gold": question.answer,
            "predicted": int(probabilities.argmax()),
            "probabilities": [round(value, 6) for value in probabilities.tolist()],
            "entropy": predictions.entropy[row].item(),
            "expected_entropy": predictions.expected_entropy[row].item(),
            "mutual_information": predictions.mutual_information[row].item(),
        }


def write_outputs(
    directory: str | Path, results: dict[str, Any], questions: Sequence[Question], predictions: Predictions
) -> None:
    """predictions.jsonl, reliability.png, then results.json, each renamed into place when complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in prediction_records(questions, predictions))
    write_atomically(directory / "predictions.jsonl", lines)
    source = f"{results['task']} / {results['split']}" if results.get("task") else Path(results.get("task_file") or "questions").name
    title = f"{source} ({results['scoring']} scoring, {results['n_samples']} draw(s))"
    save_reliability_diagram(predictions.probs, predictions.answers, directory / "reliability.png", title)
    write_atomically(directory / "results.json", json.dumps(results, indent=2) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"Hub id, local folder, or {DEFAULT_MODEL!r} (offline default)")
    parser.add_argument("--adapter", help="folder of a saved adapter (peft LoRA or Bayesian-LoRA)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help=f"registered task: {', '.join(TASKS)}")
    source.add_argument("--task-file", help="JSONL file: question, choices (list), answer (0-based), optional id")
    parser.add_argument("--split", help=f"role of the task: {', '.join(ROLES)} (default {EVALUATION_ROLE}, the evaluation split)")
    parser.add_argument("--source", default="offline", help="where task data come from: offline (default) or hub")
    parser.add_argument("--scoring", default="letter", help=f"{' or '.join(MODES)} (default letter)")
    parser.add_argument("--normalization", default="mean", help=f"cloze score: {' or '.join(NORMALIZATIONS)} (default mean)")
    parser.add_argument("--method", help="method whose predictive draws to use (default: Bayesian-LoRA draws for a Bayesian adapter)")
    parser.add_argument("--samples", type=int, help="predictive draws (default: the method's; deterministic models use 1)")
    parser.add_argument("--limit", type=int, help="first K questions only (quick checks; reported numbers use full splits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", required=True, help="folder for results.json, predictions.jsonl, reliability.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading data or a model."""
    for flag, value in (("--limit", args.limit), ("--samples", args.samples), ("--batch-size", args.batch_size)):
        check_count(flag, value)
    if args.task_file and args.split:
        raise UsageError("--split applies to --task only; a --task-file is used whole")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output!r} exists and is not a folder")
    if args.adapter and not Path(args.adapter).is_dir():
        raise UsageError(f"adapter folder {args.adapter!r} does not exist")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    Scorer.check_settings(args.scoring, args.normalization)
    split = args.split or EVALUATION_ROLE
    if args.task:
        questions = load_task(args.task, split, source=args.source, limit=args.limit)
    else:
        questions = load_task_file(args.task_file)[: args.limit]
    # tokenise everything before loading weights: prompt problems (e.g. labels that are not
    # single tokens) surface in seconds, and before anything is written
    Scorer(load_tokenizer(args.model), args.scoring, normalization=args.normalization).collate(questions)
    model, tokenizer = load_model(args.model)
    if args.adapter:
        model = attach_adapter(model, args.adapter)
    method = method_for(model, args.method)
    results, predictions = evaluate(
        model,
        tokenizer,
        questions,
        scoring=args.scoring,
        method=method,
        n_samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        normalization=args.normalization,
        progress=not args.no_progress,
    )
    results = {
        "task": args.task,
        "task_file": args.task_file,
        "split": split if args.task else None,
        "source": args.source if args.task else None,
        "model": args.model,
        "adapter": args.adapter,
        **results,
    }
    write_outputs(args.output, results, questions, predictions)
    print(
        f"{args.task or args.task_file} ({results['split'] or 'file'}, {args.scoring}, n={results['n_examples']}, "
        f"samples={results['n_samples']}): ACC {results['accuracy_percent']:.2f}%  ECE {results['ece_percent']:.2f}%  "
        f"NLL {results['nll']:.4f}  Brier {results['brier']:.4f}  ({results['seconds']:.1f} s) -> {args.output}"
    )
    return 0
