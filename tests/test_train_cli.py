"""`bayeslora train` end to end on a tiny saved model: outputs, settings precedence, bad input, the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bayeslora
from bayeslora.cli import build_parser, main
from bayeslora.errors import UsageError
from bayeslora.models import load_model
from bayeslora.train_settings import settings_from_args
from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tests.test_train_loop import fixture_questions, one_thread  # noqa: F401 (fixture)


def write_questions(path: Path, questions) -> Path:
    path.write_text("".join(json.dumps({"id": q.id, "question": q.question, "choices": list(q.choices),
                                        "answer": q.answer}) + "\n" for q in questions))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder (save_pretrained) and train / evaluation question files."""
    folder = tmp_path_factory.mktemp("inputs")
    make_tiny_llama().save_pretrained(folder / "model")
    make_tiny_tokenizer().save_pretrained(folder / "model")
    questions = fixture_questions(30)
    return {"model": str(folder / "model"),
            "train": str(write_questions(folder / "train.jsonl", questions[:20])),
            "eval": str(write_questions(folder / "eval.jsonl", questions[20:]))}


def command(files, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", files["model"], "--task-file", files["train"], "--eval-file", files["eval"],
            "--method", "bayeslora", "--scoring", "cloze", "--max-steps", "3", "--batch-size", "4",
            "--validation-size", "4", "--eval-batch-size", "8", "--precision", "fp32", "--output", str(output), *extra]


def test_train_writes_adapter_results_and_prints_the_before_after_table(files, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(command(files, output)) == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "fine-tuned" in printed
    assert f"reliability diagram: {output / 'reliability.png'}" in printed
    for name in ("run.json", "train_log.jsonl", "training.json", "adapter_config.json", "adapter_model.safetensors",
                 "results.json", "predictions.jsonl", "reliability.png", "zero_shot/results.json"):
        assert (output / name).is_file(), name
    results = json.loads((output / "results.json").read_text())
    assert results["method_name"] == "bayeslora" and results["n_samples"] == 4 and results["n_examples"] == 10
    assert len((output / "train_log.jsonl").read_text().splitlines()) == 3
    # the saved adapter is a Bayesian-LoRA peft adapter that reloads onto a fresh base model
    base, tokenizer = load_model(files["model"])
    restored = bayeslora.load_bayeslora_model(base, output)
    assert bayeslora.is_bayesian(restored)


def test_flags_override_the_yaml_config(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model: m\ntask: arc_easy\noutput: out\nlr: 1e-3\nbatch-size: 6\nlr_milestones: 3\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--lr", "2e-3"])
    settings = settings_from_args(args)
    assert settings.lr == 2e-3 and settings.batch_size == 6 and settings.lr_milestones == [3]
    assert settings.epochs == 1  # untouched default


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "0"], "lr must be > 0, got 0.0"),
        (["--lr=-1e-4"], "lr must be > 0, got -0.0001"),
        (["--epochs", "0"], "epochs must be > 0, got 0"),
        (["--batch-size", "0"], "batch_size must be > 0, got 0"),
        (["--beta=-0.5"], "beta must be >= 0, got -0.5"),
        (["--method", "bogus"], "unknown method 'bogus'"),
        (["--label-smoothing", "1.5"], "label_smoothing must be in [0, 1)"),
    ],
)
def test_bad_hyper_parameters_exit_2_with_one_line_and_write_nothing(files, tmp_path, capsys, extra, message):
    output = tmp_path / "run"
    assert main(command(files, output, *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not output.exists()


def test_bad_config_values_are_usage_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    for text, message in (("lr: fast\n", "lr must be float"), ("scoring: words\n", "scoring must be one of"),
                          ("learning_rate: 1\n", "unknown setting 'learning_rate'")):
        config.write_text(text)
        with pytest.raises(UsageError, match=message):
            settings_from_args(build_parser().parse_args(["train", "--config", str(config)]))


def test_output_directory_policy(files, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(command(files, output, "--no-zero-shot")) == 0
    results = (output / "results.json").read_bytes()
    capsys.readouterr()

    # the same or a different run in the directory: refused, nothing touched
    for extra, message in (([], "holds the same run (checkpointed); pass --resume to continue it or --overwrite"),
                           (["--lr", "1e-3"], "holds a different run; pass --overwrite to replace it")):
        assert main(command(files, output, "--no-zero-shot", *extra)) == 2
        assert message in capsys.readouterr().err
    assert main(command(files, output, "--no-zero-shot", "--lr", "1e-3", "--resume")) == 2
    assert "cannot resume" in (error := capsys.readouterr().err) and "lr was 0.0005, now 0.001" in error
    assert (output / "results.json").read_bytes() == results

    # --overwrite replaces the run
    assert main(command(files, output, "--no-zero-shot", "--lr", "1e-3", "--overwrite")) == 0
    assert json.loads((output / "run.json").read_text())["lr"] == 1e-3

    # a folder holding other files, a missing run to resume, an unwritable place
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(command(files, other)) == 2
    assert "not a bayeslora run" in capsys.readouterr().err
    assert main(command(files, tmp_path / "fresh", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(command(files, Path("/sys/bayeslora-run"))) == 2
    assert "is not writable" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
