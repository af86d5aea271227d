"""Reliability probes on the committed fixture model: every bad input or damaged file is one clear line.

Each probe damages one thing (an adapter folder, a task file, a setting, an output folder, a checkpoint)
and checks the outcome a user sees: on the command line exit code 2 and exactly one line on stderr that
names the problem, with nothing written; in Python a `ValueError` (or `FileNotFoundError`) subclass whose
one-line message starts with the damaged file's path. Never a traceback, a warning over random weights,
or a silent overwrite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import bayeslora
from bayeslora.cli import main
from bayeslora.errors import CorruptFileError, MissingFileError, OutputInUseError
from bayeslora.models import load_model
from bayeslora.output_dir import output_lock
from bayeslora.scoring import Scorer
from bayeslora.tasks import Question

FIXTURE = Path(__file__).resolve().parents[1] / "bayeslora" / "fixtures" / "smoke"
MODEL = str(FIXTURE / "model")
TRAIN, TEST = FIXTURE / "arith_train.jsonl", FIXTURE / "arith_test.jsonl"
CONTEXT = 128  # max_position_embeddings of the fixture model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A saved Bayesian-LoRA adapter and a plain peft LoRA adapter of the fixture model."""
    folder = tmp_path_factory.mktemp("adapters")
    base, _ = load_model(MODEL)
    torch.manual_seed(0)
    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"])
    bayeslora.get_bayeslora_model(base, config).save_pretrained(folder / "bayesian")
    base, _ = load_model(MODEL)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder / "plain")
    return folder


def _edit_config(**changes):
    def damage(folder: Path) -> None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return damage


def _edit_tensors(change):
    def damage(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        save_file(change(load_file(path)), path)
    return damage


def _write(name: str, data: bytes | None = None, cut: slice | None = None):
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[cut] if cut is not None else data)
    return damage


def _first_to_nan(tensors):
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    return tensors


_DELETE = object()
BAYESIAN_DAMAGE = {
    "config not JSON": (_write("adapter_config.json", b"{not json"), "adapter_config.json: not valid JSON"),
    "config a JSON list": (_write("adapter_config.json", b"[1, 2]"), "expected a JSON object, found a JSON list"),
    "config not UTF-8": (_write("adapter_config.json", b'{"r": "\xff"}'), "adapter_config.json: not UTF-8 text"),
    "r a string": (_edit_config(r="eight"), "r must be a positive integer, got 'eight'"),
    "prior_sd a string": (_edit_config(prior_sd="big"), "prior_sd must be a finite number > 0, got 'big'"),
    "prior_sd negative": (_edit_config(prior_sd=-0.1), "prior_sd must be a finite number > 0, got -0.1"),
    "flow not a bool": (_edit_config(flow="yes"), "flow must be true or false"),
    "noise_scales not a bool": (_edit_config(noise_scales="yes"), "noise_scales must be true or false"),
    "noise scales not in the weights": (_edit_config(noise_scales=True), "missing tensor"),
    "no target_modules": (_edit_config(target_modules=_DELETE), "target_modules must be"),
    "targets not in the model": (_edit_config(target_modules=["nothing_proj"], bayesian_modules=["nothing_proj"]),
                                 "adapter_config.json: Target modules"),
    "r does not match the weights": (_edit_config(r=8), "lora_A.weight' has shape [4, 32], expected [8, 32]"),
    "inducing size does not match": (_edit_config(inducing_rows=5), "lora_A.d_row_raw' has shape [9], expected [5]"),
    "other target modules": (_edit_config(target_modules=["k_proj", "v_proj"], bayesian_modules=["k_proj"]),
                             "adapter_model.safetensors: missing tensor"),
    "weights empty": (_write("adapter_model.safetensors", b""), "not a readable safetensors file"),
    "weights truncated": (_write("adapter_model.safetensors", cut=slice(0, -500)), "not a readable safetensors file"),
    "weights header cut": (_write("adapter_model.safetensors", cut=slice(0, 100)), "not a readable safetensors file"),
    "weights a pickle": (lambda folder: torch.save({"x": torch.ones(2)}, folder / "adapter_model.safetensors"),
                         "not a readable safetensors file"),
    "weights NaN": (_edit_tensors(_first_to_nan), "holds NaN or infinite values"),
    "weights integer": (_edit_tensors(lambda t: {k: v.to(torch.int32) for k, v in t.items()}), "expected floating point"),
    "weights renamed": (_edit_tensors(lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()}),
                        "adapter_model.safetensors: missing tensor"),
    "weights with an extra tensor": (_edit_tensors(lambda t: {**t, "base_model.model.extra.weight": torch.ones(2)}),
                                     "unexpected tensor 'base_model.model.extra.weight'"),
    "weights missing": (lambda folder: (folder / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    "weights only as a pickle .bin": (lambda folder: (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin"),
                                      "pickle adapters are not read"),
    "no config": (lambda folder: (folder / "adapter_config.json").unlink(), "has no adapter_config.json"),
}


def _damaged_copy(adapters: Path, kind: str, name: str, damage, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(adapters / kind, folder)
    damage(folder)
    return folder


def _one_line_error(capsys) -> str:
    """stderr is one line, the error (a progress bar that redraws itself with carriage returns aside)."""
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    lines = [line for line in lines if line]
    assert len(lines) == 1 and lines[0].startswith("bayeslora: error: "), lines
    return lines[0]


@pytest.mark.parametrize("name", list(BAYESIAN_DAMAGE))
def test_damaged_bayesian_adapter_is_refused_by_the_python_loader(adapters, tmp_path, name):
    damage, message = BAYESIAN_DAMAGE[name]
    folder = _damaged_copy(adapters, "bayesian", name, damage, tmp_path)
    base, _ = load_model(MODEL)
    with pytest.raises((CorruptFileError, MissingFileError)) as raised:
        bayeslora.load_bayeslora_model(base, folder)
    assert isinstance(raised.value, ValueError)
    assert message in str(raised.value) and str(folder) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("name", list(BAYESIAN_DAMAGE))
def test_damaged_bayesian_adapter_is_one_line_exit_2_for_evaluate(adapters, tmp_path, capsys, name):
    damage, message = BAYESIAN_DAMAGE[name]
    folder = _damaged_copy(adapters, "bayesian", name, damage, tmp_path)
    output = tmp_path / "out"
    assert main(["evaluate", "--no-progress", "--model", MODEL, "--task-file", str(TEST), "--scoring", "cloze",
                 "--adapter", str(folder), "--output", str(output)]) == 2
    assert message in _one_line_error(capsys)
    assert not output.exists()


PLAIN_DAMAGE = {
    "weights renamed": (_edit_tensors(lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()}), "missing tensor"),
    "weights NaN": (_edit_tensors(_first_to_nan), "holds NaN or infinite values"),
    "r does not match the weights": (_edit_config(r=2), "expected [2, 32]"),
    "not LoRA": (_edit_config(peft_type="IA3"), "a IA3 adapter; only LoRA and Bayesian-LoRA adapters load"),
}


@pytest.mark.parametrize("name", list(PLAIN_DAMAGE))
def test_damaged_plain_lora_adapter_is_refused(adapters, tmp_path, name):
    damage, message = PLAIN_DAMAGE[name]
    folder = _damaged_copy(adapters, "plain", name, damage, tmp_path)
    base, _ = load_model(MODEL)
    with pytest.raises(CorruptFileError, match=message.replace("[", r"\[")):
        bayeslora.adapter.load_adapter(base, folder)


def test_intact_adapters_load_with_every_saved_value(adapters):
    """The verified loader restores exactly the saved tensors, frozen, for both kinds."""
    from peft import get_peft_model_state_dict

    for kind in ("bayesian", "plain"):
        base, _ = load_model(MODEL)
        model = bayeslora.adapter.load_adapter(base, adapters / kind)
        saved = load_file(adapters / kind / "adapter_model.safetensors")
        restored = get_peft_model_state_dict(model)
        assert set(restored) == set(saved)
        assert all(torch.equal(restored[name], saved[name]) for name in saved)
        assert not any(p.requires_grad for p in model.parameters())
        assert bayeslora.is_bayesian(model) == (kind == "bayesian")


# ------------------------------------------------------------------------------------------- inputs


def _task_file(tmp_path: Path, first_line: bytes) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_bytes(first_line + b"\n" + TEST.read_bytes())
    return path


def _evaluate(task_file: Path, output: Path, *extra: str) -> int:
    return main(["evaluate", "--no-progress", "--model", MODEL, "--task-file", str(task_file), "--scoring", "cloze",
                 "--output", str(output), *extra])


def _long_question(words: int) -> bytes:
    return json.dumps({"id": "long-1", "question": " ".join(["7 plus"] * (words // 2)), "choices": ["14", "13"],
                       "answer": 0}).encode()


BAD_INPUTS = {
    "non-UTF-8 bytes": ('{"question": "Qu\xe9?", "choices": ["a", "b"], "answer": 0}'.encode("latin-1"),
                        "questions.jsonl line 1: not UTF-8 text (byte 0xe9 at column 17)"),
    "duplicate choices": (json.dumps({"id": "dup-1", "question": "1 + 1?", "choices": ["2", "2", "3"], "answer": 0}).encode(),
                          "question 'dup-1' lists the choice '2' more than once"),
    "longer than the context": (_long_question(20_000), "question 'long-1' is 20005 tokens (prompt + longest choice), "
                                                        f"longer than the model's context of {CONTEXT}"),
    "far longer than the context": (_long_question(200_000), "question 'long-1' is 200005 tokens"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_bad_task_files_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, name, command):
    line, message = BAD_INPUTS[name]
    task_file, output = _task_file(tmp_path, line), tmp_path / "out"
    if command == "evaluate":
        code = _evaluate(task_file, output)
    else:
        code = main(["train", "--model", MODEL, "--task-file", str(task_file), "--method", "mle", "--scoring", "cloze",
                     "--validation-size", "4", "--output", str(output)])
    assert code == 2
    assert message in _one_line_error(capsys)
    assert not output.exists()


def test_truncate_left_keeps_the_end_of_a_long_prompt(tmp_path):
    """With the flag, a long question is scored on the last tokens of its prompt: exactly the prompt a user
    would get by cutting it to fit (prompt + longest choice = the model's context)."""
    _, tokenizer = load_model(MODEL)
    long = Question("long-1", " ".join(["7 plus"] * 500) + " 7?", ("14", "13"), 0)
    scorer = Scorer(tokenizer, "cloze", max_length=CONTEXT, truncate_left=True)
    batch = scorer.collate([long])
    full_prompt = tokenizer("Question: " + long.question + "\nAnswer:")["input_ids"]
    longest = max(len(tokenizer(" " + choice, add_special_tokens=False)["input_ids"]) for choice in long.choices)
    assert batch["prompt_ids"][0].tolist() == full_prompt[-(CONTEXT - longest):]
    output = tmp_path / "out"
    assert _evaluate(_task_file(tmp_path, _long_question(20_000)), output, "--truncate-left") == 0
    assert json.loads((output / "results.json").read_text())["n_examples"] == 25


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("flag", ["--lr", "--beta", "--lora-alpha", "--max-grad-norm", "--entropy-bonus"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_settings_that_cannot_be_finite_are_refused_up_front(tmp_path, capsys, flag, value):
    output = tmp_path / "out"
    assert main(["train", "--model", MODEL, "--task-file", str(TRAIN), "--output", str(output), f"{flag}={value}"]) == 2
    assert f"{flag[2:].replace('-', '_')} must be a finite number, got {value}" in _one_line_error(capsys)
    assert not output.exists()


# ------------------------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """An evaluate output folder holding results."""
    output = tmp_path_factory.mktemp("evaluated") / "out"
    assert _evaluate(TEST, output) == 0
    return output


def test_evaluate_refuses_a_folder_holding_results_unless_overwrite(evaluated, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(evaluated, output)
    before = (output / "results.json").read_bytes()
    assert _evaluate(TEST, output, "--seed", "3") == 2
    assert "already holds evaluation results (results.json); pass --overwrite" in _one_line_error(capsys)
    assert (output / "results.json").read_bytes() == before
    assert _evaluate(TEST, output, "--seed", "3", "--overwrite") == 0
    assert json.loads((output / "results.json").read_text())["seed"] == 3


@pytest.mark.parametrize("output, message", [("/sys/bayeslora-probe", "is not writable"),
                                              ("/dev/null/out", "cannot be created: /dev/null is not a directory")])
def test_evaluate_checks_its_output_before_loading_anything(capsys, output, message):
    assert _evaluate(TEST, Path(output)) == 2
    assert message in _one_line_error(capsys)


def test_a_second_writer_to_a_locked_folder_refuses(tmp_path, capsys):
    output = tmp_path / "out"
    with output_lock(output):
        assert _evaluate(TEST, output) == 2
        assert "is in use by another bayeslora process" in _one_line_error(capsys)
        with pytest.raises(OutputInUseError), output_lock(output):
            pass
    assert not (output / "results.json").exists()
    assert _evaluate(TEST, output) == 0  # released: the folder is usable again


# ------------------------------------------------------------------------------------------- run folders

RUN = ["train", "--model", MODEL, "--task", "smoke_arith", "--method", "bayeslora", "--scoring", "cloze",
       "--max-steps", "2", "--batch-size", "4", "--limit-validation", "4", "--limit-eval", "4", "--precision", "fp32",
       "--no-zero-shot", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "run"
    assert main([*RUN, "--output", str(output)]) == 0
    return output


def _checkpoint_file(name: str):
    def path(run: Path) -> Path:
        return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / name
    return path


def _cut(locate):
    def damage(run: Path) -> None:
        path = locate(run)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return damage


def _nan_checkpoint_adapter(run: Path) -> None:
    path = _checkpoint_file("adapter.safetensors")(run)
    save_file(_first_to_nan(load_file(path)), path)


RUN_DAMAGE = {
    "dangling latest pointer": (lambda run: (run / "checkpoints" / "latest").write_text("step-000099"),
                                "checkpoints/latest: names no checkpoint of this run ('step-000099')"),
    "checkpoint adapter cut short": (_cut(_checkpoint_file("adapter.safetensors")), "adapter.safetensors: not a readable safetensors file"),
    "checkpoint adapter with NaN": (_nan_checkpoint_adapter, "holds NaN or infinite values"),
    "optimizer state cut short": (_cut(_checkpoint_file("accelerate/optimizer.bin")), "optimizer.bin: not a readable torch state"),
    "scheduler state cut short": (_cut(_checkpoint_file("scheduler.pt")), "scheduler.pt: not a readable torch state"),
    "checkpoint state not JSON": (lambda run: _checkpoint_file("state.json")(run).write_text("{"), "state.json: not valid JSON"),
    "checkpoint state without a step": (lambda run: _checkpoint_file("state.json")(run).write_text("{}"), "state.json: not a checkpoint state"),
    "random state missing": (lambda run: _checkpoint_file("accelerate/random_states_0.pkl")(run).unlink(),
                             "random_states_0.pkl: no such file"),
    "checkpoint of an earlier format": (lambda run: shutil.rmtree(_checkpoint_file("accelerate")(run)),
                                        "holds no accelerate/ state (a checkpoint of an earlier bayeslora"),
    "run.json not JSON": (lambda run: (run / "run.json").write_text('{"model": '),
                          "run.json: not valid JSON (Expecting value, line 1 column 11); pass --overwrite to start the run again"),
}


@pytest.mark.parametrize("name", list(RUN_DAMAGE))
def test_a_damaged_run_folder_is_one_line_exit_2_on_resume(finished_run, tmp_path, capsys, name):
    damage, message = RUN_DAMAGE[name]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"}
    assert main([*RUN, "--output", str(run), "--resume"]) == 2
    assert message in _one_line_error(capsys)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"} == before


def test_run_identity_uses_resolved_paths_and_a_run_without_checkpoint_restarts(finished_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    monkeypatch.chdir(tmp_path)
    for spelling in ("run", "run/", str(run), "./run//"):
        assert main([*RUN, "--output", spelling, "--resume"]) == 0
    capsys.readouterr()
    # a kill before the first checkpoint leaves run.json alone: the message says how to go on, and --resume does
    for path in list(run.iterdir()):
        if path.name != "run.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert main([*RUN, "--output", "run"]) == 2
    assert "holds the same run (no checkpoint yet); pass --resume to continue it" in _one_line_error(capsys)
    assert main([*RUN, "--output", "run", "--resume"]) == 0
    assert load_file(run / "adapter_model.safetensors").keys() == load_file(finished_run / "adapter_model.safetensors").keys()
    expected, resumed = (load_file(folder / "adapter_model.safetensors") for folder in (finished_run, run))
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_settings_are_checked_before_anything_is_written(tmp_path, capsys):
    """A batch larger than the training set is refused before run.json exists, so the corrected run starts."""
    output = tmp_path / "run"
    assert main([*RUN, "--output", str(output), "--batch-size", "100"]) == 2
    assert "batch_size 100 exceeds the 48 training questions" in _one_line_error(capsys)
    assert not output.exists()
    assert main([*RUN, "--output", str(output)]) == 0


def test_stale_staging_files_are_removed_on_the_next_start(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / ".staging-x1").mkdir()
    (run / ".results.json.abc").write_text("half")
    (run / "checkpoints" / ".latest.x").write_text("step")
    (run / "checkpoints" / ".tmp-step-000009").mkdir()
    assert main([*RUN, "--output", str(run), "--resume"]) == 0
    assert [path.name for path in run.rglob(".*")] == [".lock"]


def test_stale_temporaries_outside_excluded_folders_go_and_locks_stay(tmp_path):
    from bayeslora.output_dir import LOCK_FILE, remove_stale_temporaries

    stale = [tmp_path / ".grid.json.tmp", tmp_path / "tables" / ".cost.md.x", tmp_path / ".staging"]
    kept = [tmp_path / LOCK_FILE, tmp_path / "tables" / "cost.md", tmp_path / "runs" / "mle" / ".results.json.x"]
    for path in stale[:2] + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (stale[2] / "inner").mkdir(parents=True)
    assert sorted(remove_stale_temporaries(tmp_path, exclude=("runs",))) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)


def test_a_half_written_log_line_is_dropped_on_resume(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with (run / "train_log.jsonl").open("a") as log:
        log.write('{"step": 3, "ep')
    assert main([*RUN, "--output", str(run), "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_diverging_run_stops_with_exit_1_naming_the_step_and_the_module(tmp_path, capsys):
    """lr = 1e6 makes the first update unusable (its factors' Cholesky factorisation fails): the run stops there,
    and no checkpoint of unusable parameters is written."""
    output = tmp_path / "run"
    assert main([*RUN, "--output", str(output), "--lr", "1e6"]) == 1
    segments = [part for line in capsys.readouterr().err.split("\n") for part in line.split("\r")]
    stops = [part for part in segments if part.startswith("bayeslora:")]
    assert len(stops) == 1 and "training stopped: optimizer step 1: the parameters can no longer be used (module " \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default); no checkpoint had been written" in stops[0]
    assert not (output / "checkpoints" / "latest").exists() and not (output / "adapter_model.safetensors").exists()
