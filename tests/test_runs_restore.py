"""Every method restores from its run folder: `evaluate --adapter RUN` and `bayeslora.load_run` reproduce the run.

Each method trains for two steps on the committed smoke fixture (tiny Llama, arithmetic questions); the run's
own results.json is the reference. Restoring rebuilds everything from the folder's files alone.
"""

import json
import shutil

import pytest
import torch

import bayeslora
from bayeslora.cli import main
from bayeslora.presets import ALL_METHODS, FIXTURE_MODEL
from bayeslora.errors import UsageError
from bayeslora.tasks import load_task_file

METRICS = ("accuracy_percent", "ece_percent", "mce_percent", "nll", "brier", "n_samples", "n_examples")
TRAIN = FIXTURE_MODEL.parent / "arith_train.jsonl"
TEST = FIXTURE_MODEL.parent / "arith_test.jsonl"
# small post-hoc searches, as in the smoke preset
METHOD_OPTIONS = {"laplace": {"prior_grid": [1.0, 100.0], "tune_samples": 2},
                  "laplace_last": {"prior_grid": [1.0, 100.0], "tune_samples": 2},
                  "tfb": {"search_steps": 3, "search_samples": 2}}


def train_run(output, method, *extra, model=FIXTURE_MODEL):
    """`bayeslora train` for two steps on the smoke fixture; the run's results.json."""
    config = output.parent / f"{method}-options.yaml"
    config.write_text(json.dumps({"method_options": METHOD_OPTIONS.get(method, {})}))
    argv = ["train", "--model", str(model), "--task-file", str(TRAIN), "--eval-file", str(TEST),
            "--method", method, "--config", str(config), "--max-steps", "2", "--batch-size", "4", "--r", "4",
            "--validation-size", "8", "--lr", "1e-2", "--precision", "fp32", "--no-zero-shot", "--samples", "2",
            "--eval-batch-size", "8", "--scoring", "cloze", "--output", str(output), *extra]
    assert main(argv) == 0
    return json.loads((output / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained run folder per method."""
    root = tmp_path_factory.mktemp("runs")
    return {method: (root / method, train_run(root / method, method)) for method in ALL_METHODS}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_evaluate_without_method_reproduces_the_run(runs, method, tmp_path, capsys):
    run, reference = runs[method]
    assert main(["evaluate", "--adapter", str(run), "--task-file", str(TEST), "--output", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["method"] == method
    assert {k: again[k] for k in METRICS} == {k: reference[k] for k in METRICS}


def test_what_was_fitted_is_saved(runs):
    def fitted(method):
        return json.loads((runs[method][0] / "method.json").read_text())["fitted"]

    assert fitted("temperature")["temperature"] != 1.0
    assert fitted("laplace")["prior_precision"] in (1.0, 100.0)
    assert fitted("tfb")["sigma"] > 0
    for name in ("member_1", "member_2"):  # the ensemble's other members, in peft's subfolders
        assert (runs["ensemble"][0] / name / "adapter_model.safetensors").is_file()


def test_load_run_predicts_the_runs_averaged_probabilities(runs):
    run, reference = runs["laplace"]
    restored = bayeslora.load_run(run)
    questions = load_task_file(TEST)
    predictions = restored.predict(questions)
    assert predictions.n_samples == 2 and len(predictions.probs) == len(questions)
    saved = [json.loads(line)["probabilities"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    for row, probabilities in enumerate(saved):  # the run rounded them to 6 decimals
        torch.testing.assert_close(predictions.probs[row, : len(probabilities)], torch.tensor(probabilities),
                                   atol=1e-6, rtol=0)
    nll = -predictions.probs[torch.arange(len(questions)), predictions.answers].log().mean()
    assert nll.item() == pytest.approx(reference["nll"], abs=1e-6)


def test_a_bare_adapter_is_refused_for_a_method_that_fitted_something(runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(runs["temperature"][0] / name, bare / name)
    assert main(["evaluate", "--model", str(FIXTURE_MODEL), "--adapter", str(bare), "--method", "temperature",
                 "--task-file", str(TEST), "--scoring", "cloze", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--method temperature is restored from a run folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _fails(capsys, tmp_path, run, *extra) -> str:
    output = tmp_path / "out"
    assert main(["evaluate", "--adapter", str(run), "--task-file", str(TEST), "--output", str(output), "--no-progress",
                 *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bayeslora: error:")]
    assert len(errors) == 1 and not output.exists()
    return errors[0]


def _copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


def test_another_methods_adapter_in_a_run_folder_is_refused(runs, tmp_path, capsys):
    run = _copy(runs["laplace"][0], tmp_path)
    shutil.copy(runs["bayeslora"][0] / "adapter_model.safetensors", run / "adapter_model.safetensors")
    assert "adapter_model.safetensors is not an adapter of method laplace (unexpected tensor" in _fails(capsys, tmp_path, run)


def test_a_method_other_than_the_runs_is_refused(runs, tmp_path, capsys):
    assert "was trained with method mle, not laplace" in _fails(capsys, tmp_path, runs["mle"][0], "--method", "laplace")


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("method_state.safetensors", "truncate", "method_state.safetensors cannot be read"),
    ("method_state.safetensors", "delete", "lacks method_state.safetensors"),
    ("adapter_model.safetensors", "truncate", "adapter_model.safetensors cannot be read"),
    ("adapter_model.safetensors", "delete", "lacks adapter_model.safetensors"),
    ("method.json", "truncate", "method.json is not readable JSON"),
])
def test_a_missing_or_truncated_file_is_one_line(runs, tmp_path, capsys, name, damage, message):
    run = _copy(runs["laplace"][0], tmp_path)
    path = run / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert message in _fails(capsys, tmp_path, run)


def test_load_run_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UsageError, match="is not a bayeslora run folder"):
        bayeslora.load_run(tmp_path)


def test_a_compare_unit_restores_with_its_loading_and_reproduces_its_evaluations(tmp_path, capsys):
    output = tmp_path / "grid"
    # laplace after map: its unit fits post hoc on map's trained adapter (adapter_from) and must still restore
    assert main(["compare", "--preset", "smoke", "--methods", "map,laplace", "--dtype", "bf16", "--output", str(output)]) == 0
    unit = output / "runs" / "smoke_arith" / "laplace" / "seed-1"
    assert json.loads((unit / "method.json").read_text())["loading"]["dtype"] == "bf16"
    for task, reference in (("smoke_arith", unit), ("smoke_shift", unit / "eval" / "smoke_shift")):
        again = tmp_path / f"again-{task}"
        assert main(["evaluate", "--adapter", str(unit), "--task", task, "--output", str(again), "--no-progress"]) == 0
        expected = json.loads((reference / "results.json").read_text())
        assert {k: json.loads((again / "results.json").read_text())[k] for k in METRICS} == {k: expected[k] for k in METRICS}
