"""One run path: a `compare` unit is the `train` run with the same settings, and both read settings the same way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bayeslora.cli import main
from bayeslora.presets import FIXTURE_MODEL
from tests.conftest import libraries_of_this_process
from tests.test_train_loop import one_thread  # noqa: F401 (fixture)

# a YAML file as people write it: PyYAML reads 5e-4 (no dot) as the string '5e-4'
TRAIN_CONFIG = "lr: 5e-4\nprecision: fp32\nmax_steps: 2\nbatch_size: 4\neval_batch_size: 8\nr: 4\nlimit_validation: 8\n"
METRICS = ("accuracy_percent", "ece_percent", "mce_percent", "nll", "brier", "n_samples", "n_examples")


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    return error[0]


@pytest.mark.parametrize("method", ["bayeslora", "ensemble"])
def test_a_compare_unit_is_the_train_run_with_the_same_settings(tmp_path, capsys, method):
    config = tmp_path / "train.yaml"
    config.write_text(TRAIN_CONFIG)
    assert main(["train", "--config", str(config), "--model", str(FIXTURE_MODEL), "--task", "smoke_arith",
                 "--method", method, "--scoring", "cloze", "--seed", "1", "--no-zero-shot",
                 "--output", str(tmp_path / "train")]) == 0
    assert main(["compare", "--train-config", str(config), "--model", str(FIXTURE_MODEL), "--tasks", "smoke_arith",
                 "--methods", method, "--output", str(tmp_path / "compare")]) == 0
    capsys.readouterr()
    train, unit = tmp_path / "train", tmp_path / "compare" / "runs" / "smoke_arith" / method / "seed-1"

    # the same run: the same settings recorded, the same learning rate (a float), the same adapter, the same results
    ran = json.loads((train / "run.json").read_text())
    assert ran == json.loads((unit / "run.json").read_text())  # the output folder is where a run is, not what it is
    assert ran["lr"] == 0.0005
    logs = sorted(train.glob("**/train_log.jsonl"))
    assert logs and all(json.loads(line)["lr"] == 0.0005 for log in logs for line in log.read_text().splitlines())
    adapters = sorted(path.relative_to(train) for path in train.glob("**/adapter_model.safetensors"))
    assert adapters == sorted(path.relative_to(unit) for path in unit.glob("**/adapter_model.safetensors"))
    assert len(adapters) == (3 if method == "ensemble" else 1)  # peft saves each named member in its folder
    for adapter in adapters:
        expected, actual = load_file(train / adapter), load_file(unit / adapter)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # one meaning of validation: the task's validation role (capped by limit_validation), not a train hold-out
    for folder in (train, unit):
        summary = json.loads((folder / "training.json").read_text())
        assert {k: v for k, v in summary.items() if k not in ("members", "train_seconds", "libraries")} == \
            {"n_train": 48, "n_validation": 8}
        assert {name: summary["libraries"][name] for name in libraries_of_this_process()} == libraries_of_this_process()
    results, unit_results = (json.loads((folder / "results.json").read_text()) for folder in (train, unit))
    assert {key: results[key] for key in METRICS} == {key: unit_results[key] for key in METRICS}
    assert results["n_samples"] == (3 if method == "ensemble" else 4)  # the method's own default


def test_an_invalid_train_config_value_exits_2_with_one_line_in_both_commands(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("lr: fast\n")
    train = ["train", "--config", str(config), "--model", str(FIXTURE_MODEL), "--task", "smoke_arith",
             "--output", str(tmp_path / "train")]
    assert main(train) == 2
    assert "lr must be float, got 'fast'" in _one_line_error(capsys)
    assert main([*train[:1], *train[3:], "--validation-size", "4"]) == 2  # no config: only this value is wrong
    assert "a registry task selects on its validation role" in _one_line_error(capsys)
    compare = ["compare", "--train-config", str(config), "--tasks", "smoke_arith", "--methods", "mle",
               "--output", str(tmp_path / "compare")]
    assert main(compare) == 2
    assert "--train-config: lr must be float, got 'fast'" in _one_line_error(capsys)
    for text, message in (("lr: -1\n", "lr must be > 0, got -1.0"), ("seed: 3\n", "'seed' is set by compare"),
                          ("learning_rate: 1\n", "unknown setting 'learning_rate'")):
        config.write_text(text)
        assert main(compare) == 2
        assert message in _one_line_error(capsys)
    assert not (tmp_path / "train").exists() and not (tmp_path / "compare").exists()


def test_the_protocol_modules_import_no_method():
    code = ("import sys, bayeslora.predictive, bayeslora.scoring, bayeslora.metrics, bayeslora.tasks; "
            "print(sorted(name for name in sys.modules if name.startswith('bayeslora.methods')))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
