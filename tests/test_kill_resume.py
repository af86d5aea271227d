"""No lost or mixed work: `train` and `compare` killed with SIGKILL resume to the same result; one writer per folder.

Each kill is real: `bayeslora train` (or `compare`) runs in a subprocess on the committed fixture model, and
a small driver makes that process SIGKILL itself at a chosen point: inside an optimizer step, half-way
through writing a checkpoint file, while the `latest` pointer is replaced, half-way through the final
adapter, half-way through the evaluation's results.json. The run is then resumed with `--resume` (compare:
rerun) and must end exactly where an uninterrupted run ends: the same adapter bit for bit, the same
results, no step repeated beyond one checkpoint interval, no temporary file left behind, and at every
moment every finished file complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bayeslora.cli import main
from bayeslora.output_dir import is_in_use
from bayeslora.presets import FIXTURE_MODEL

CHECKPOINT_EVERY = 2
STEPS = 6
TRAIN = ["train", "--model", str(FIXTURE_MODEL), "--task", "smoke_arith", "--method", "bayeslora", "--scoring", "cloze",
         "--max-steps", str(STEPS), "--batch-size", "4", "--limit-validation", "8", "--limit-eval", "8",
         "--eval-batch-size", "8", "--precision", "fp32", "--no-zero-shot", "--seed", "3",
         "--checkpoint-every", str(CHECKPOINT_EVERY), "--checkpoint-minutes", "0"]

# Runs `bayeslora` with one function wrapped so that the process SIGKILLs itself at the planned point.
# A planned file write first leaves a half-written staging file, as a kill inside the write would.
DRIVER = r"""
import json, os, signal, sys
from pathlib import Path
import bayeslora.checkpoint, bayeslora.evaluate, bayeslora.files, bayeslora.train

plan = json.loads(sys.argv[1])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def half_written(write):
    def wrapped(path, data):
        path = Path(path)
        if path.name == plan["file"] and (plan.get("folder") is None or path.parent.name == plan["folder"]):
            raw = data.encode() if isinstance(data, str) else data
            (path.parent / f".{path.name}.partial").write_bytes(raw[: len(raw) // 2])
            die()
        return write(path, data)
    return wrapped

if plan["kind"] == "step":  # inside optimizer step plan["step"] (1-based), after its forward pass
    calls, task_loss = [0], bayeslora.train.task_loss
    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == plan["step"]:
            die()
        return task_loss(*args, **kwargs)
    bayeslora.train.task_loss = counted
else:  # a file write: the module whose writes are planned
    module = {"checkpoint": bayeslora.checkpoint, "files": bayeslora.files, "evaluate": bayeslora.evaluate}[plan["kind"]]
    module.write_atomically = half_written(module.write_atomically)

from bayeslora.cli import main
from bayeslora.errors import OutputInUseError
from bayeslora.output_dir import check_not_in_use
sys.exit(main(sys.argv[2:]))
"""


def run_killed(plan: dict, argv: list[str], cwd: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(plan), *argv], cwd=cwd, env=environment,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]


def assert_finished_files_complete(output: Path) -> None:
    """Every result file present is whole (parses); staging files are the only partial ones."""
    for path in output.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)


def latest_step(output: Path) -> int:
    pointer = output / "checkpoints" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main([*TRAIN, "--output", str(output)]) == 0
    return output


KILLS = {
    "inside step 1, before any checkpoint": ({"kind": "step", "step": 1}, 1),
    "inside step 5": ({"kind": "step", "step": 5}, 5),
    "writing a checkpoint's scheduler.pt": ({"kind": "checkpoint", "file": "scheduler.pt", "folder": ".tmp-step-000004"}, 4),
    "replacing checkpoints/latest": ({"kind": "checkpoint", "file": "latest", "folder": "checkpoints"}, 2),
    "writing the final adapter": ({"kind": "files", "file": "adapter_model.safetensors"}, STEPS),
    "writing the evaluation's results.json": ({"kind": "evaluate", "file": "results.json"}, STEPS),
}


@pytest.mark.parametrize("point", list(KILLS))
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, point):
    plan, killed_at_step = KILLS[point]
    output = tmp_path / "run"
    run_killed(plan, [*TRAIN, "--output", str(output)], tmp_path)
    assert_finished_files_complete(output)
    assert not (output / "results.json").exists()
    # at most one checkpoint interval of steps is done again
    assert killed_at_step - latest_step(output) <= CHECKPOINT_EVERY

    assert main([*TRAIN, "--output", str(output), "--resume"]) == 0
    expected, resumed = load_file(uninterrupted / "adapter_model.safetensors"), load_file(output / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    results, reference = (json.loads((folder / "results.json").read_text()) for folder in (output, uninterrupted))
    where_and_when = ("adapter", "seconds")  # the run's folder and its wall-clock time
    assert {k: v for k, v in results.items() if k not in where_and_when} == \
        {k: v for k, v in reference.items() if k not in where_and_when}
    log = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, STEPS + 1))
    assert [path.name for path in output.rglob(".*")] == [".lock"]  # every staging file was cleaned up


def test_a_second_run_on_the_same_folder_refuses_in_one_line(tmp_path, capsys):
    """While one run trains (held inside its first step), another on the same folder refuses; the first is intact."""
    output = tmp_path / "run"
    gate = tmp_path / "go-on"
    driver = ("import sys, time, pathlib, bayeslora.train\n"
              "step = bayeslora.train.task_loss\n"
              "def held(*a, **k):\n"
              f"    while not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
              "    return step(*a, **k)\n"
              "bayeslora.train.task_loss = held\n"
              "from bayeslora.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen([sys.executable, "-c", driver, *TRAIN, "--output", str(output)], env=environment,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output / "run.json").is_file():  # recorded under the lock: the first run holds it now
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.1)
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main([*TRAIN, "--output", str(output), *extra]) == 2
            error = capsys.readouterr().err.strip().splitlines()
            assert len(error) == 1 and "is in use by another bayeslora process" in error[0], error
    finally:
        gate.touch()
        first.wait(timeout=300)
    assert first.returncode == 0
    log = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, STEPS + 1))


COMPARE = ["compare", "--preset", "smoke", "--methods", "mle,map", "--limit-eval", "8", "--limit-validation", "8"]


def test_a_compare_killed_mid_unit_leaves_no_unit_running_and_a_rerun_reuses_finished_units(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main([*COMPARE, "--output", str(reference)]) == 0
    output = tmp_path / "killed"
    # SIGKILL compare's own process from inside the second unit's first step (the first unit has finished:
    # its cost.json exists); the unit must not outlive it
    driver = ("import os, signal, sys, time, pathlib, bayeslora.train\n"
              "step = bayeslora.train.task_loss\n"
              "def kill_parent(*a, **k):\n"
              "    if os.environ.get('UNIT_MARK') and pathlib.Path(os.environ['UNIT_MARK']).exists():\n"
              "        pathlib.Path(os.environ['UNIT_PID']).write_text(str(os.getpid()))\n"
              "        os.kill(os.getppid(), signal.SIGKILL)\n"
              "        time.sleep(30)\n"
              "    return step(*a, **k)\n"
              "bayeslora.train.task_loss = kill_parent\n"
              "from bayeslora.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    mark = output / "runs" / "smoke_arith" / "mle" / "seed-1" / "cost.json"  # the first unit is finished
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                   "UNIT_MARK": str(mark), "UNIT_PID": str(tmp_path / "unit.pid")}
    # output to a file, not a pipe: waiting for a pipe's end would wait for the unit process too
    with (tmp_path / "compare.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-c", driver, *COMPARE, "--output", str(output)], env=environment,
                                   stdout=log, stderr=subprocess.STDOUT)
        assert process.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "compare.log").read_text()[-2000:]
    unit = int((tmp_path / "unit.pid").read_text())
    killed_unit = output / "runs" / "smoke_arith" / "map" / "seed-1"
    # the unit (sleeping 30 s after the kill) must die with compare; on a busy machine that can take seconds
    deadline = time.monotonic() + 20
    while (_running(unit) or is_in_use(output) or is_in_use(killed_unit)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(unit), "the unit process outlived compare"
    assert not is_in_use(output), "compare's folder is still locked"
    assert not is_in_use(killed_unit), "the killed unit's folder is still locked"
    finished = mark.read_bytes()

    capsys.readouterr()
    assert main([*COMPARE, "--output", str(output)]) == 0
    assert "smoke_arith / mle / seed 1: finished earlier, reused" in capsys.readouterr().out
    assert mark.read_bytes() == finished
    tables = [json.loads((folder / "table.json").read_text()) for folder in (output, reference)]
    for part in ("in_distribution", "out_of_distribution"):
        assert tables[0][part] == tables[1][part]


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False
