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

import torch
from torch import nn
from transformers.utils import logging as transformers_logging

import bayeslora
from bayeslora.adapter import check_adapter, load_adapter
from bayeslora.adapter_source import read_adapter_config
from bayeslora.diagnostics import draw_disagreement
from bayeslora.environment import library_versions
from bayeslora.errors import UsageError, check_count
from bayeslora.files import write_atomically
from bayeslora.methods import METHODS, Method, check_method_name, get_method
from bayeslora.metrics import all_metrics
from bayeslora.models import DEFAULT_MODEL, context_length, load_model, load_model_config, load_tokenizer
from bayeslora.output_dir import check_not_in_use, check_writable, output_lock, remove_stale_temporaries
from bayeslora.plots import save_reliability_diagram
from bayeslora.predictive import Predictions, predict
from bayeslora.runs import is_run_folder, load_run, read_record
from bayeslora.scoring import MODES, NORMALIZATIONS, Scorer
from bayeslora.tasks import EVALUATION_ROLE, ROLES, TASKS, Question, load_task, load_task_file
from bayeslora.train_settings import LOADING_SETTINGS, add_setting_flags, loading_from_args

PROTOCOL_VERSION = "bayeslora-eval-v1"


def method_for(model: nn.Module, name: str | None = None) -> Method | None:
    """The named method; else the Bayesian-LoRA predictive for a Bayesian model; else None (deterministic)."""
    if name is not None:
        return get_method(name)
    return get_method("bayeslora") if bayeslora.is_bayesian(model) else None


def check_adapter_for_method(name_or_path: str, config: dict[str, Any], method: str | None) -> None:
    """Refuse a bare adapter that cannot carry `method` (its fitted state lives in run folders only)."""
    bayesian = "bayesian_modules" in config
    peft_type = config.get("peft_type")
    if method is None:
        return
    if METHODS[method].needs_run_folder:
        raise UsageError(f"--method {method} is restored from a run folder of `bayeslora train` (method.json); "
                         f"{name_or_path!r} is a bare adapter without what {method} fitted")
    if peft_type != "LORA":
        raise UsageError(f"adapter {name_or_path!r} is a {peft_type} adapter; --method applies to LoRA adapters")
    if bayesian != (method == "bayeslora"):
        kind = "a Bayesian-LoRA" if bayesian else "a plain LoRA"
        raise UsageError(f"adapter {name_or_path!r} is {kind} adapter, not one for --method {method}")
    if method == "mcdropout" and not config.get("lora_dropout"):
        raise UsageError(f"adapter {name_or_path!r} has lora_dropout 0: MC-dropout draws would all be the same")


def attach_adapter(model: nn.Module, name_or_path: str | Path) -> nn.Module:
    """A saved adapter (local folder or Hub id) on `model`, every tensor verified (`adapter.load_adapter`):
    Bayesian-LoRA when its config says so, else plain peft."""
    return load_adapter(model, name_or_path)


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
    truncate_left: bool = False,
) -> tuple[dict[str, Any], Predictions]:
    """Metrics of `model` on `questions` and the per-question predictions.

    `n_samples` None: the method's own default (1 without a method);
    `seconds` is the wall-clock time of scoring, model loading excluded. A question
    longer than the model's context is refused, or with `truncate_left` shortened
    from the left (`Scorer`).
    """
    config = getattr(model, "config", None)
    scorer = Scorer(tokenizer, scoring, normalization=normalization,
                    max_length=context_length(config) if config is not None else None, truncate_left=truncate_left)
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
        "libraries": library_versions(),
        "units": {
            "accuracy_percent": "percent",
            "ece_percent": "percent, 15 equal-width confidence bins",
            "mce_percent": "percent, 15 equal-width confidence bins",
            "nll": "nats per question",
            "brier": "sum over choices, per question",
            "mutual_information": "nats per question (mean; _wrong / _right: over wrongly / rightly answered ones)",
            "draw_spread": "standard deviation over draws of a choice's log-probability, mean over choices and questions",
            "seconds": "wall-clock seconds of scoring",
            "libraries": "installed versions of Python and the libraries the result depends on",
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


def read_predictions(paths: Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled (probabilities [N, C], gold answers [N]) of predictions.jsonl files; questions with fewer
    choices are padded with probability 0, as the metrics expect."""
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    if not rows:
        raise UsageError(f"no predictions in {', '.join(map(str, paths))}")
    width = max(len(row["probabilities"]) for row in rows)
    probs = torch.tensor([row["probabilities"] + [0.0] * (width - len(row["probabilities"])) for row in rows])
    return probs, torch.tensor([row["gold"] for row in rows])


#: scoring settings of a plain evaluation; a run folder's own evaluation settings replace them
DEFAULT_SETTINGS = {"scoring": "letter", "normalization": "mean", "seed": 0, "batch_size": 8, "samples": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=f"Hub id, local folder, or {DEFAULT_MODEL!r} (offline default); "
                        "default for a run folder: its base model")
    parser.add_argument("--adapter", help="a run folder of `bayeslora train` (restores its method), or a saved peft "
                        "LoRA / Bayesian-LoRA adapter: a local folder or a Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help=f"registered task: {', '.join(TASKS)}")
    source.add_argument("--task-file", help="JSONL file: question, choices (list), answer (0-based), optional id")
    parser.add_argument("--split", help=f"role of the task: {', '.join(ROLES)} (default {EVALUATION_ROLE}, the evaluation split)")
    parser.add_argument("--source", default="offline", help="where task data come from: offline (default) or hub")
    # the next five default to a run folder's own settings, else to DEFAULT_SETTINGS
    parser.add_argument("--scoring", help=f"{' or '.join(MODES)} (default letter)")
    parser.add_argument("--normalization", help=f"cloze score: {' or '.join(NORMALIZATIONS)} (default mean)")
    parser.add_argument("--samples", type=int, help="predictive draws (default: the method's; deterministic models use 1)")
    parser.add_argument("--seed", type=int, help="seed of the predictive draws (default 0)")
    parser.add_argument("--batch-size", type=int, help="questions per forward pass (default 8)")
    parser.add_argument("--method", help="method whose predictive draws to use (default: the run folder's method; "
                        "Bayesian-LoRA draws for a Bayesian adapter)")
    parser.add_argument("--limit", type=int, help="first K questions only (quick checks; reported numbers use full splits)")
    add_setting_flags(parser, LOADING_SETTINGS)
    parser.add_argument("--output", required=True, help="folder for results.json, predictions.jsonl, reliability.png")
    parser.add_argument("--overwrite", action="store_true", help="replace the evaluation results already in --output")
    parser.add_argument("--truncate-left", action="store_true",
                        help="shorten questions longer than the model's context from the left (default: refuse them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


#: what `write_outputs` writes; a folder holding any of them holds results
OUTPUT_FILES = ("results.json", "predictions.jsonl", "reliability.png")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse (UsageError) an output folder that cannot be written or holds results, unless `overwrite`."""
    check_writable(output)
    held = [name for name in OUTPUT_FILES if (output / name).exists()]
    if held and not overwrite:
        raise UsageError(f"output {output} already holds evaluation results ({held[0]}); "
                         f"pass --overwrite to replace them, or choose another folder")


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading data or a model."""
    for flag, value in (("--limit", args.limit), ("--samples", args.samples), ("--batch-size", args.batch_size)):
        check_count(flag, value)
    if args.task_file and args.split:
        raise UsageError("--split applies to --task only; a --task-file is used whole")
    check_not_in_use(Path(args.output))
    check_output(Path(args.output), args.overwrite)
    if args.method is not None:
        check_method_name(args.method)


def _run_record(args: argparse.Namespace) -> dict[str, Any] | None:
    """method.json when --adapter is a run folder (checked against --method), else None (a bare adapter is checked)."""
    if not args.adapter:
        return None
    if not is_run_folder(args.adapter):
        check_adapter_for_method(args.adapter, read_adapter_config(args.adapter), args.method)
        return None
    record = read_record(args.adapter)
    if args.method is not None and args.method != record["method"]:
        raise UsageError(f"run folder {args.adapter!r} was trained with method {record['method']}, not {args.method}; "
                         "leave out --method")
    return record


def _settings(args: argparse.Namespace, record: dict[str, Any] | None) -> dict[str, Any]:
    """Scoring settings: the flags given, else the run folder's own, else DEFAULT_SETTINGS."""
    recorded = record["evaluation"] if record else {}
    return {name: getattr(args, name) if getattr(args, name) is not None else recorded.get(name, default)
            for name, default in DEFAULT_SETTINGS.items()}


def _model_and_method(args: argparse.Namespace, model_name: str, record: dict[str, Any] | None):
    """(model with its adapter, tokenizer, method): a restored run, or a base model with an optional bare adapter."""
    loading = loading_from_args(args)
    if record is not None:
        restored = load_run(args.adapter, model=model_name, **loading)
        return restored.model, restored.tokenizer, restored.method
    model, tokenizer = load_model(model_name, **loading)
    if args.adapter:
        model = attach_adapter(model, args.adapter)
    return model, tokenizer, method_for(model, args.method)


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if args.no_progress:
        transformers_logging.disable_progress_bar()  # its weight-loading bar too
    record = _run_record(args)
    model_name = args.model or (record["model"] if record else None)
    if model_name is None:
        raise UsageError("--model is required (a run folder given as --adapter names its own base model)")
    settings = _settings(args, record)
    Scorer.check_settings(settings["scoring"], settings["normalization"])
    split = args.split or EVALUATION_ROLE
    if args.task:
        questions = load_task(args.task, split, source=args.source, limit=args.limit)
    else:
        questions = load_task_file(args.task_file)[: args.limit]
    # everything is checked before weights load or anything is written: every question is tokenised
    # (labels that are not single tokens, questions longer than the model's context) and a bare
    # adapter's every tensor is checked against a weightless skeleton of the model
    model_config = load_model_config(model_name)
    Scorer(load_tokenizer(model_name), settings["scoring"], normalization=settings["normalization"],
           max_length=context_length(model_config), truncate_left=args.truncate_left).check(questions)
    if args.adapter and record is None:
        check_adapter(args.adapter, model_config)
    output = Path(args.output)
    with output_lock(output):
        check_output(output, args.overwrite)  # again, now that no other process can write there
        remove_stale_temporaries(output)
        model, tokenizer, method = _model_and_method(args, model_name, record)
        results, predictions = evaluate(
            model,
            tokenizer,
            questions,
            scoring=settings["scoring"],
            method=method,
            n_samples=settings["samples"],
            seed=settings["seed"],
            batch_size=settings["batch_size"],
            normalization=settings["normalization"],
            progress=not args.no_progress,
            truncate_left=args.truncate_left,
        )
        results = {
            "task": args.task,
            "task_file": args.task_file,
            "split": split if args.task else None,
            "source": args.source if args.task else None,
            "model": model_name,
            "adapter": args.adapter,
            **results,
        }
        write_outputs(output, results, questions, predictions)
    print(
        f"{args.task or args.task_file} ({results['split'] or 'file'}, {settings['scoring']}, n={results['n_examples']}, "
        f"samples={results['n_samples']}): ACC {results['accuracy_percent']:.2f}%  ECE {results['ece_percent']:.2f}%  "
        f"NLL {results['nll']:.4f}  Brier {results['brier']:.4f}  ({results['seconds']:.1f} s) -> {args.output}"
    )
    return 0
