"""`bayeslora compare`: every (task, method, seed) as one `train` run, then the comparison tables (`report`).

    bayeslora compare --tasks arc_easy --methods mle,map,bayeslora --seeds 1,2,3 --output runs/compare
    bayeslora compare --preset smoke --output /tmp/smoke        # all methods, tiny fixture, ~1-2 minutes
A *unit* (training task, method, seed) is the run `bayeslora train` does with the grid's training
settings (`experiment.run_experiment`): flags, `--train-config` and preset are `train`'s settings,
checked alike. The `--ood-from` task's units are also evaluated on each `--ood-tasks` test set. A
post-hoc method (temperature, laplace, laplace_last, tfb) fits its base method's (map's) unit of the
same task and seed instead of training an adapter; the base method joins the grid when it is not
listed, so a post-hoc unit is the same however the grid was split into runs. Each unit runs in
its own process and writes DIR/runs/<task>/<method>/seed-<seed>/: a `train` run directory, plus
eval/<ood task>/ and, last, cost.json. A rerun skips finished units and resumes the others; one with
different settings in the same DIR is refused. A finished base unit whose adapter is gone (a grid's results are
committed, its weights never are) is trained again before its post-hoc units, and its new adapter is used only if
it reproduces the unit's recorded test probabilities. Several compares may share DIR (say `--methods mle` and
`--methods bayeslora` on two cores or GPUs): each unit's run folder is locked by the process running it and
the others leave it alone, so each process runs the units no other is running. The tables cover every
finished unit in DIR, also those of methods and seeds that earlier or concurrent runs added.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from bayeslora.errors import OutputInUseError, UsageError
from bayeslora.files import write_atomically
from bayeslora.output_dir import end_with_parent, holds_files, is_in_use, output_lock, remove_stale_temporaries
from bayeslora.presets import PRESETS
from bayeslora.saved_files import read_json_object
from bayeslora.tasks import check_tasks
from bayeslora.train_settings import LOADING_SETTINGS, NOT_IDENTITY, TrainSettings, add_setting_flags, given_settings, make_settings, read_config, read_yaml_mapping

#: the training settings compare takes as flags (every other one through --train-config)
SETTING_FLAGS = (*LOADING_SETTINGS, "scoring", "samples", "epochs", "max_steps", "batch_size", "lr", "limit_train",
                 "limit_validation", "limit_eval", "eval_batch_size", "report_to")
DEFAULTS = {"scoring": "cloze", "zero_shot": False}  # SmolLM2-135M is at chance with letters; the base is no unit
#: a unit process's exit status when another process holds its run folder
UNIT_IN_USE = 75
#: the largest difference in a test probability a retrained adapter may show against its unit's predictions.jsonl
#: (which rounds to 1e-6): a retraining on the same machine and thread count repeats the run exactly
REBUILD_TOLERANCE = 1e-4
#: settings each unit sets itself
OWNED = dict.fromkeys(("model", "task", "task_file", "eval_file", "method", "method_options", "output", "seed", "adapter_from"))


@dataclass
class Grid:
    model: str
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    ood_from: str | None
    ood_tasks: list[str]
    train: dict[str, Any]  # the training settings every unit shares (TrainSettings values)
    method_options: dict[str, dict[str, Any]]
    output: Path = field(compare=False)

    def training_tasks(self) -> list[str]:  # the OoD source trains too
        return self.tasks + ([self.ood_from] if self.ood_from and self.ood_from not in self.tasks else [])

    def eval_tasks(self, task: str) -> list[str]:
        return ([task] if task in self.tasks else []) + (self.ood_tasks if task == self.ood_from else [])

    def unit_dir(self, task: str, method: str, seed: int) -> Path:
        return self.output / "runs" / task / method / f"seed-{seed}"

    def results_dir(self, train_task: str, eval_task: str, method: str, seed: int) -> Path:
        """Where a unit's evaluation on `eval_task` is: the run directory itself for its own task."""
        unit = self.unit_dir(train_task, method, seed)
        return unit if eval_task == train_task else unit / "eval" / eval_task

    def base_method(self, method: str) -> str | None:
        """The method whose unit a post-hoc method's unit starts from (always in the grid: `resolve_grid`)."""
        from bayeslora.methods import METHODS

        return METHODS[method].post_hoc_of

    def units(self) -> list[tuple[str, str, int]]:
        """(task, method, seed) in running order: a post-hoc method after the method whose adapter it reuses."""
        methods = sorted(self.methods, key=lambda method: self.base_method(method) is not None)
        return [(task, method, seed) for task in self.training_tasks() for method in methods for seed in self.seeds]

    def settings(self, task: str, method: str, seed: int) -> TrainSettings:
        """The settings of one unit, validated: those of the `bayeslora train` run it is."""
        base = self.base_method(method)
        return make_settings({**self.train, **OWNED, "model": self.model, "task": task, "method": method, "seed": seed,
                              "method_options": self.method_options.get(method, {}),
                              "output": str(self.unit_dir(task, method, seed)),
                              "adapter_from": str(self.unit_dir(task, base, seed)) if base else None})

    def identity(self) -> dict[str, Any]:
        """What every unit of DIR shares; units may be added (tasks, methods, seeds), settings not changed."""
        shared = {key: value for key, value in self.train.items() if key not in NOT_IDENTITY}
        return {"model": self.model, **shared, "method_options": self.method_options}


def _names(text: str | None, what: str, kind: type = str) -> list | None:
    """A comma-separated flag value: distinct names (or integers, `kind=int`); None when the flag is not given."""
    names = None if text is None else [name.strip() for name in text.split(",") if name.strip()]
    if names == []:
        raise UsageError(f"--{what} is empty")
    if names and (duplicates := sorted({name for name in names if names.count(name) > 1})):
        raise UsageError(f"--{what} lists {', '.join(duplicates)} more than once")
    try:
        return names and [kind(name) for name in names]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated integers, got {text!r}") from None


def resolve_grid(args: argparse.Namespace) -> Grid:
    """The grid the flags and the preset describe, checked; nothing is written."""
    from bayeslora.methods import METHODS, check_method_name

    preset = PRESETS[args.preset] if args.preset else {}
    tasks = _names(args.tasks, "tasks") or preset.get("tasks")
    methods = _names(args.methods, "methods") or preset.get("methods")
    seeds = _names(args.seeds, "seeds", int) or preset.get("seeds") or [1]
    ood_from = args.ood_from or (preset.get("ood_from") if args.ood_tasks is None else None)
    ood_tasks = _names(args.ood_tasks, "ood-tasks") or (preset.get("ood_tasks", []) if args.ood_from is None else [])
    if not tasks:
        raise UsageError("no tasks: give --tasks (or a --preset)")
    if not methods:
        raise UsageError("no methods: give --methods (or a --preset)")
    if bool(ood_from) != bool(ood_tasks):
        raise UsageError("--ood-from and --ood-tasks go together: give both or neither")
    for name in methods:
        check_method_name(name, " in --methods")
    bases = [METHODS[name].post_hoc_of for name in methods if METHODS[name].post_hoc_of]
    methods = [*dict.fromkeys(base for base in bases if base not in methods), *methods]
    check_tasks(tasks, ("train", "test"), " in --tasks")
    if ood_from:
        check_tasks([ood_from], ("train",), " in --ood-from")
        check_tasks(ood_tasks, ("test",), " in --ood-tasks")

    train = {**DEFAULTS, **preset.get("train", {})}
    if args.train_config:
        config = read_config(args.train_config, "--train-config")
        for name in config:
            if name in OWNED:
                raise UsageError(f"--train-config: {name!r} is set by compare for each unit, not in the file")
        train.update(config)
    train.update(given_settings(args, SETTING_FLAGS))
    method_options = dict(preset.get("method_options", {}))
    if args.method_options:
        method_options.update(read_yaml_mapping(args.method_options, "--method-options"))
    for name, options in method_options.items():
        if name not in METHODS or not isinstance(options, dict):
            raise UsageError(f"--method-options: {name!r} must be a method name mapping to its options")
    model = args.model or preset.get("model") or "smollm2-135m"
    grid = Grid(model, tasks, methods, seeds, ood_from, ood_tasks or [], train, method_options, Path(args.output))
    grid.settings(tasks[0], methods[0], seeds[0])  # every shared setting checked before anything is written
    return grid


def with_finished_units(grid: Grid) -> Grid:
    """`grid` widened to every method and seed with a finished unit in its directory, for the tables: a grid is
    often run a method or a seed at a time, and its tables should be the same whichever run wrote them last."""
    from bayeslora.presets import ALL_METHODS

    found = set()
    for task in grid.training_tasks():
        for unit in (grid.output / "runs" / task).glob("*/seed-*"):
            method, seed = unit.parent.name, unit.name.removeprefix("seed-")
            if seed.isdigit() and unit_finished(grid, task, method, int(seed)):
                found.add((method, int(seed)))
    methods = {*grid.methods, *(method for method, _ in found)}
    in_order = [method for method in ALL_METHODS if method in methods] + sorted(methods - set(ALL_METHODS))
    return replace(grid, methods=in_order, seeds=sorted({*grid.seeds, *(seed for _, seed in found)}))


def unit_finished(grid: Grid, task: str, method: str, seed: int) -> bool:
    results = [grid.results_dir(task, name, method, seed) / "results.json" for name in grid.eval_tasks(task)]
    return all(path.is_file() for path in [grid.unit_dir(task, method, seed) / "cost.json", *results])


def run_unit(grid: Grid, task: str, method: str, seed: int) -> None:
    """In its own process: the unit's `train` run (or its resumption), then cost.json; an error goes to error.txt."""
    from bayeslora.checkpoint import has_checkpoint
    from bayeslora.experiment import run_experiment
    from bayeslora.report import write_cost

    directory = grid.unit_dir(task, method, seed)
    with unit_process(directory):
        resume = has_checkpoint(directory)
        ood = [name for name in grid.eval_tasks(task) if name != task]
        run = run_experiment(grid.settings(task, method, seed), ood, resume=resume, overwrite=not resume)
        write_cost(directory, run, {task: run.evaluation, **run.extra_evaluations})


def has_adapter(grid: Grid, task: str, method: str, seed: int) -> bool:
    return (grid.unit_dir(task, method, seed) / "adapter_model.safetensors").is_file()


def rebuild_adapter(grid: Grid, task: str, method: str, seed: int) -> None:
    """In its own process: train a finished unit again, in <unit>/rebuild/ (resumable), for the adapter its
    post-hoc units fit; the adapter joins the unit only if its test probabilities are the unit's recorded ones
    (`REBUILD_TOLERANCE`), so a post-hoc unit never fits a different adapter than the one its base unit reported."""
    from bayeslora.checkpoint import has_checkpoint
    from bayeslora.evaluate import read_predictions
    from bayeslora.experiment import run_experiment
    from bayeslora.runs import RECORD, STATE

    unit = grid.unit_dir(task, method, seed)
    folder = unit / "rebuild"
    with unit_process(unit):
        resume = has_checkpoint(folder)
        run_experiment(replace(grid.settings(task, method, seed), output=str(folder)), resume=resume,
                       overwrite=not resume)
        (recorded, gold), (rebuilt, rebuilt_gold) = read_predictions([unit / "predictions.jsonl"]), read_predictions(
            [folder / "predictions.jsonl"])
        if recorded.shape != rebuilt.shape or not gold.equal(rebuilt_gold):
            raise UsageError(f"the retrained {method} adapter of {unit} was evaluated on other questions than the unit")
        difference = (recorded - rebuilt).abs().max().item()
        if difference > REBUILD_TOLERANCE:
            raise UsageError(f"the retrained {method} adapter of {unit} does not repeat the unit (test probabilities "
                             f"differ by up to {difference:.2g} > {REBUILD_TOLERANCE:g}; another machine or thread "
                             f"count?); remove the unit and those of its post-hoc methods to run them all again")
        with output_lock(unit):
            for name in ("adapter_config.json", "adapter_model.safetensors", STATE, RECORD):
                os.replace(folder / name, unit / name)
            write_atomically(unit / "rebuilt.json", json.dumps({"max_probability_difference": difference}) + "\n")
        shutil.rmtree(folder)


@contextlib.contextmanager
def unit_process(directory: Path) -> Iterator[None]:
    """The frame of a unit's process: it ends with compare, an error goes to `directory`/error.txt and another
    process holding the unit's folder exits with `UNIT_IN_USE`."""
    import torch

    end_with_parent()  # no unit keeps writing unsupervised once compare is gone (SIGKILL included)
    # a forked child rebuilds torch's CPU thread pool on its first use; do it here, on one thread, before the
    # model loader's worker threads reach it together (they raced: "Invalid thread pool!", when the parent had
    # used torch before forking, as a test session does)
    torch.set_num_threads(torch.get_num_threads())
    (directory / "error.txt").unlink(missing_ok=True)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        yield
    except OutputInUseError:  # another compare took the unit since the parent looked: it is that one's
        sys.exit(UNIT_IN_USE)
    except BaseException as error:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / "error.txt", f"{type(error).__name__}: {error}\n")
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named grids (bayeslora.presets: smoke, calibration, "
                        "paper); flags given override the preset")
    parser.add_argument("--model", help="Hub id, local folder or embedded model name (default smollm2-135m)")
    parser.add_argument("--tasks", help="comma-separated registry task names")
    parser.add_argument("--methods", help="comma-separated method names (bayeslora.methods)")
    parser.add_argument("--seeds", help="comma-separated integer seeds (default 1)")
    parser.add_argument("--ood-from", help="task whose adapters are also evaluated on --ood-tasks, without retraining")
    parser.add_argument("--ood-tasks", help="comma-separated tasks (test role) for the out-of-distribution table")
    parser.add_argument("--output", required=True, help="comparison directory (reused: finished units are skipped)")
    add_setting_flags(parser, SETTING_FLAGS, DEFAULTS)
    parser.add_argument("--train-config", help="YAML of further training settings (keys of `bayeslora train`)")
    parser.add_argument("--method-options", help="YAML: method name -> options of its constructor")


def check_output(grid: Grid) -> None:
    """Refuse a DIR that holds something else, or a comparison with other settings."""
    if grid.output.exists() and not grid.output.is_dir():
        raise UsageError(f"--output {grid.output} exists and is not a directory")
    grid_file = grid.output / "grid.json"
    if grid_file.is_file():
        previous = {key: value for key, value in read_json_object(grid_file).get("identity", {}).items()
                    if key not in NOT_IDENTITY}  # written before these settings left the identity
        current = json.loads(json.dumps(grid.identity()))
        for key in sorted(set(previous) | set(current)):
            if previous.get(key) != current.get(key):
                raise UsageError(f"--output {grid.output} holds a comparison with {key} = {previous.get(key)!r}, "
                                 f"not {current.get(key)!r}; choose another directory")
    elif holds_files(grid.output):
        raise UsageError(f"--output {grid.output} is not empty and holds no comparison; choose another directory")


def run(args: argparse.Namespace) -> int:
    grid = resolve_grid(args)
    check_output(grid)
    # DIR's own files (grid.json, the tables) are written under its lock, taken in turn by concurrent compares;
    # the units' run folders (runs/) have locks of their own
    with output_lock(grid.output, wait=True):
        check_output(grid)
        remove_stale_temporaries(grid.output, exclude=("runs",))
        write_atomically(grid.output / "grid.json", json.dumps({"identity": grid.identity()}, indent=2) + "\n")
    return _run_grid(grid)


def _run_grid(grid: Grid) -> int:
    """Every unit not finished yet and not running in another process, each in its own process, then the tables."""
    from bayeslora.report import write_tables

    units = grid.units()
    # fork where the platform has it: no torch re-import per unit, and the parent ran no torch computation
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    failures, elsewhere = [], []
    running_elsewhere = "running in another process, which writes the tables again"
    for index, (task, method, seed) in enumerate(units, 1):
        unit = f"[{index}/{len(units)}] {task} / {method} / seed {seed}"
        if unit_finished(grid, task, method, seed):
            print(f"{unit}: finished earlier, reused", flush=True)
            continue
        base = grid.base_method(method)
        if base and not unit_finished(grid, task, base, seed):
            if is_in_use(grid.unit_dir(task, base, seed)):
                elsewhere.append(f"{task} / {method} / seed {seed}: rerun once {base}'s unit, running in another "
                                 f"process, has finished")
            else:
                failures.append(f"{task} / {method} / seed {seed}: its base unit ({base}) did not finish")
            print(f"{unit}: its base unit ({base}) is not finished, left for a rerun", flush=True)
            continue
        if is_in_use(grid.unit_dir(task, method, seed)):
            elsewhere.append(f"{task} / {method} / seed {seed}: {running_elsewhere}")
            print(f"{unit}: running in another process, left to it", flush=True)
            continue
        steps = [(run_unit, method)]
        if base and not has_adapter(grid, task, base, seed):
            print(f"{unit}: {base}'s unit kept its results but not its adapter; training it again", flush=True)
            steps.insert(0, (rebuild_adapter, base))
        print(unit, flush=True)
        for target, ran in steps:
            process = context.Process(target=target, args=(grid, task, ran, seed))
            process.start()
            try:
                process.join()
            except KeyboardInterrupt:
                process.terminate()
                process.join()
                print("interrupted: finished units are kept; rerun the same command to continue", flush=True)
                return 130
            if process.exitcode == UNIT_IN_USE:
                elsewhere.append(f"{task} / {method} / seed {seed}: {running_elsewhere}")
            elif process.exitcode != 0:
                error = grid.unit_dir(task, ran, seed) / "error.txt"
                reason = error.read_text().strip() if error.is_file() else f"exit code {process.exitcode}"
                failures.append(f"{task} / {method} / seed {seed}: {reason}")
            if process.exitcode != 0:
                break
    with output_lock(grid.output, wait=True):
        write_tables(with_finished_units(grid))
    print(f"wrote {grid.output / 'table.md'} and {grid.output / 'table.json'}")
    for unit in elsewhere:
        print(f"not run here: {unit}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0
