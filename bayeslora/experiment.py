"""One experiment: validated settings in, a trained adapter and its evaluations out; and `bayeslora train`.

    bayeslora train --model smollm2-135m --task arc_easy --method bayeslora --scoring cloze --output runs/a

`run_experiment` is the one way an adapter is trained and evaluated:
`bayeslora train` calls it once, and each unit of `bayeslora compare` calls it
with its (task, method, seed). In order: load the questions, the model and
tokenizer, the scorer and the method; optionally evaluate the base model
(zero_shot/); seed and build the method's adapter (`prepare`); train it with
the one loop (`train.fit`, which ends with the method's post-hoc fit); save the
adapter; evaluate it with the one evaluation path. A post-hoc method may
instead start from the adapter of a finished run of its base method
(`adapter_from`, how `compare` avoids training the same adapter twice): it is
loaded, fitted post hoc, saved and evaluated, not trained.

Data (docs/protocol.md, "Validation"): a registry task trains on its train
role, selects (best epoch, early stopping) and fits post hoc (temperature,
Laplace prior, TFB) on its validation role, and is evaluated on its test role.
A --task-file has no roles: `validation_size` of its questions are held out
(seeded by `validation_seed`) for selection and post-hoc fitting, and
--eval-file is evaluated. Extra evaluation tasks (compare's out-of-distribution
sets) are evaluated on their test role into `<output>/eval/<task>/`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from rich.console import Console
from rich.table import Table
from torch import nn

from bayeslora.adapter import whole_factor_vectors
from bayeslora.checkpoint import check_output_dir, start_run_dir
from bayeslora.environment import library_versions
from bayeslora.errors import UsageError
from bayeslora.evaluate import evaluate, write_outputs
from bayeslora.files import write_atomically, write_files_atomically
from bayeslora.methods import Method, get_method
from bayeslora.models import context_length, load_model, load_model_config, load_tokenizer
from bayeslora.output_dir import check_not_in_use, output_lock
from bayeslora.runs import save_method_state
from bayeslora.scoring import Scorer
from bayeslora.sharding import check_launch, is_sharded
from bayeslora.tasks import EVALUATION_ROLE, Question, load_task, load_task_file
from bayeslora.saved_files import read_json_object, read_tensors
from bayeslora.tracking import accelerator_options, start_tracking
from bayeslora.train import TrainingDiverged, check_batches, fit, post_hoc_fit
from bayeslora.train_settings import FILE_VALIDATION_SIZE, TrainSettings, add_arguments, settings_from_args

__all__ = ["Experiment", "add_arguments", "load_questions", "run", "run_experiment", "split_validation"]


@dataclass
class Experiment:
    """What one run produced (on the main process): its evaluations and what it cost."""

    method: Method
    n_train: int
    n_validation: int
    trainable_parameters: int
    train_seconds: float
    device: str
    evaluation: dict[str, Any] | None  # the task's test role or --eval-file; None without one
    extra_evaluations: dict[str, dict[str, Any]]  # task name -> results of its test role
    zero_shot: dict[str, Any] | None


def split_validation(questions: Sequence, size: int, seed: int, limit: int | None) -> tuple[list, list]:
    """Hold out `size` questions (seeded) for model selection; the rest, capped at `limit`, is for training."""
    if size >= len(questions):
        raise UsageError(f"validation_size {size} leaves no training questions (the training split has {len(questions)})")
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed)).tolist()
    validation = [questions[i] for i in order[:size]]
    train = [questions[i] for i in sorted(order[size:])]
    return train[:limit], validation


def load_questions(settings: TrainSettings) -> tuple[list[Question], list[Question], list[Question]]:
    """(train, validation, evaluation) questions of the run; see the module docstring."""
    s = settings
    if s.task is not None:
        train = load_task(s.task, "train", source=s.source, limit=s.limit_train)
        validation = load_task(s.task, "validation", source=s.source, limit=s.limit_validation)
        return train, validation, load_task(s.task, EVALUATION_ROLE, source=s.source, limit=s.limit_eval)
    size = FILE_VALIDATION_SIZE if s.validation_size is None else s.validation_size
    train, validation = split_validation(load_task_file(s.task_file), size, s.validation_seed, s.limit_train)
    evaluation = load_task_file(s.eval_file)[: s.limit_eval] if s.eval_file else []
    return train, validation[: s.limit_validation], evaluation


def trainable_parameters(model: nn.Module, method: Method) -> int:
    """Parameters the loop trains, summed over an ensemble's members."""
    total = 0
    for member in method.members(model):
        with member:
            total += sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total


def load_trained_adapter(model: nn.Module, directory: Path) -> None:
    """Copy the adapter a finished run saved (peft format) into `model`; every trainable tensor must be in it."""
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise UsageError(f"adapter_from: no trained adapter in {directory} (did its run finish?)")
    loaded = set_peft_model_state_dict(model, read_tensors(path))  # readable, floating point, finite
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    mismatch = sorted(trainable & set(loaded.missing_keys)) + sorted(loaded.unexpected_keys)
    if mismatch:
        raise UsageError(f"{path} does not fit this method's adapter (first mismatch: {mismatch[0]})")


def run_scorer(tokenizer, settings: TrainSettings, model_config) -> Scorer:
    """The scorer a run's settings define (scoring, normalization, truncation) for a model of `model_config`."""
    return Scorer(tokenizer, settings.scoring, normalization=settings.normalization,
                  max_length=context_length(model_config), truncate_left=settings.truncate_left)


def run_experiment(settings: TrainSettings, extra_eval_tasks: Sequence[str] = (), *, resume: bool = False,
                   overwrite: bool = False) -> Experiment | None:
    """Train and evaluate one adapter into `settings.output` (see the module docstring); None on other processes.

    `extra_eval_tasks`: registry tasks also evaluated (test role) into `<output>/eval/<task>/`. `resume`
    continues the run in the output directory from its checkpoints, `overwrite` replaces it; raises
    `train.TrainingDiverged` when the loss stops being finite.
    """
    output = Path(settings.output)
    identity = settings.run_identity()
    check_not_in_use(output)
    check_output_dir(output, identity, resume=resume, overwrite=overwrite)
    train, validation, evaluation = load_questions(settings)
    extras = {task: load_task(task, EVALUATION_ROLE, source=settings.source, limit=settings.limit_eval)
              for task in extra_eval_tasks}
    method = get_method(settings.method, **settings.method_options)
    # fail before loading weights or writing anything if the model cannot score every question (letter
    # labels that are not single tokens, questions longer than its context)
    every = [*train, *validation, *evaluation, *(q for questions in extras.values() for q in questions)]
    run_scorer(load_tokenizer(settings.model), settings, load_model_config(settings.model)).check(every)
    # without a GPU, accelerate runs several launched processes as one gloo group only when told cpu=True
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **accelerator_options(settings.report_to, output))
    if accelerator.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise UsageError(f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up "
                         f"{accelerator.num_processes}; check the accelerate launch settings")
    check_launch(accelerator.state, os.environ)
    check_batches(settings, len(train), accelerator.num_processes)
    # one writer at a time: a second run on this folder refuses instead of interleaving with this one
    with output_lock(output) if accelerator.is_main_process else contextlib.nullcontext():
        if accelerator.is_main_process:
            check_output_dir(output, identity, resume=resume, overwrite=overwrite)  # again, now that it is ours
            start_run_dir(output, identity, resume=resume, overwrite=overwrite)
        accelerator.wait_for_everyone()
        start_tracking(accelerator, settings.report_to, identity, run_name=str(output))
        return _train_and_evaluate(settings, method, train, validation, evaluation, extras, output, accelerator, resume)


def _train_and_evaluate(settings: TrainSettings, method: Method, train: list[Question], validation: list[Question],
                        evaluation: list[Question], extras: dict[str, list[Question]], output: Path,
                        accelerator: Accelerator, resume: bool) -> Experiment | None:
    """`run_experiment` once its inputs are checked and its output directory is locked and recorded."""
    model, tokenizer = load_model(settings.model, **settings.loading())
    scorer = run_scorer(tokenizer, settings, model.config)
    zero_shot = None
    if settings.zero_shot and evaluation and accelerator.is_main_process:
        if (output / "zero_shot" / "results.json").is_file():  # a resumed run evaluated the base model already
            zero_shot = read_json_object(output / "zero_shot" / "results.json")
        else:
            zero_shot = evaluate_into(output / "zero_shot", model, tokenizer, evaluation, None, settings, adapter=None)
    accelerator.wait_for_everyone()

    set_seed(settings.seed)  # the adapter initialisation: the same on every process
    lora = settings.lora()
    model = method.prepare(model, lora)
    set_seed(settings.seed, device_specific=True)  # posterior draws and dropout: one stream per process
    start = time.perf_counter()
    if settings.adapter_from is None:
        results = fit(model, scorer, method, train, validation, settings, output, accelerator, resume=resume)
    else:  # a post-hoc method on its base method's trained adapter: fit, do not train
        load_trained_adapter(model, Path(settings.adapter_from))
        model.to(accelerator.device)
        post_hoc_fit(model, scorer, method, train, validation, settings.eval_batch_size, accelerator.device)
        results = []
    # a resumed run also counts the training time its checkpoints kept from the processes before
    train_seconds = time.perf_counter() - start + sum(result.resumed_seconds for result in results)
    accelerator.end_training()  # closes the tracker's run (nothing without one)
    main, sharded = accelerator.is_main_process, is_sharded(accelerator)
    if not main and not sharded:  # a sharded model's forward passes, and gathering it, need every process
        return None
    # under FSDP the main process saves from the state dict gathered from every process's shard (peft saves the
    # base weights of adapted embedding layers too); elsewhere peft reads the model's own
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if main:
        with whole_factor_vectors():
            write_files_atomically(output, lambda folder: model.save_pretrained(folder, state_dict=state_dict))
        save_method_state(output, method, options=settings.method_options, lora=lora, model=settings.model,
                          loading=settings.loading(), evaluation=evaluation_record(settings))
        summary = {"n_train": len(train), "n_validation": len(validation), "train_seconds": train_seconds,
                   "libraries": library_versions(), "members": [dataclasses.asdict(r) for r in results]}
        write_atomically(output / "training.json", json.dumps(summary, indent=1))
    after = None
    if evaluation:
        after = evaluate_into(output, model, tokenizer, evaluation, method, settings, write=main, adapter=str(output),
                              method_name=settings.method)
    extra_results = {task: evaluate_into(output / "eval" / task, model, tokenizer, questions, method, settings, write=main,
                                         adapter=str(output), method_name=settings.method, task=task,
                                         split=EVALUATION_ROLE, train_task=settings.task or settings.task_file)
                     for task, questions in extras.items()}
    if not main:
        return None
    return Experiment(method, len(train), len(validation), trainable_parameters(model, method), train_seconds,
                      str(accelerator.device), after, extra_results, zero_shot)


def evaluation_record(settings: TrainSettings) -> dict[str, Any]:
    """The scoring settings of the run's own evaluations (`evaluate_into`), kept in its run folder."""
    return {"scoring": settings.scoring, "normalization": settings.normalization, "samples": settings.samples,
            "seed": settings.seed, "batch_size": settings.eval_batch_size}


def evaluate_into(directory: Path, model: nn.Module, tokenizer, questions: Sequence, method, settings: TrainSettings,
                  write: bool = True, **description: Any) -> dict[str, Any]:
    """The protocol's evaluation path: results.json, predictions.jsonl, reliability.png in `directory` (with
    `write`; the other processes of a sharded model only take part in its forward passes)."""
    results, predictions = evaluate(model, tokenizer, questions, settings.scoring, method, settings.samples,
                                    settings.seed, settings.eval_batch_size, settings.normalization, progress=write,
                                    truncate_left=settings.truncate_left)
    results = {"task": settings.task, "task_file": settings.eval_file, "split": EVALUATION_ROLE if settings.task else None,
               "model": settings.model, "limit_eval": settings.limit_eval, **description, **results}
    if write:
        write_outputs(directory, results, questions, predictions)
    return results


def print_summary(before: dict | None, after: dict, output: Path) -> None:
    table = Table(title=f"{after['task'] or after['task_file']}: {after['n_examples']} evaluation questions, "
                        f"{after['scoring']} scoring")
    for column in ("model", "draws", "ACC %", "ECE %", "NLL (nats)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, results in (("zero-shot", before), ("fine-tuned", after)):
        if results is not None:
            table.add_row(name, str(results["n_samples"]), f"{results['accuracy_percent']:.1f}",
                          f"{results['ece_percent']:.1f}", f"{results['nll']:.3f}")
    Console().print(table)
    print(f"reliability diagram: {output / 'reliability.png'}")


def run(args: argparse.Namespace) -> int:
    """`bayeslora train`."""
    settings = settings_from_args(args)
    try:
        experiment = run_experiment(settings, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as error:
        print(f"bayeslora: training stopped: {error}", file=sys.stderr)
        return 1
    if experiment is not None and experiment.evaluation is not None:
        print_summary(experiment.zero_shot, experiment.evaluation, Path(settings.output))
    return 0
