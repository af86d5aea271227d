"""Loading bigger models: --dtype and --load-in-4bit / --load-in-8bit, with the Bayesian factors kept in fp32."""

import importlib.util
import json

import pytest
import torch

import bayeslora
from bayeslora.cli import main
from bayeslora.presets import FIXTURE_MODEL
from bayeslora.layer import BayesianFactors
from tests.conftest import make_tiny_llama
from tests.test_runs_restore import METRICS, TEST, TRAIN, train_run

TRAIN_FLAGS = ["train", "--model", str(FIXTURE_MODEL), "--task-file", str(TRAIN),
               "--scoring", "cloze"]
EVALUATE_FLAGS = ["evaluate", "--model", str(FIXTURE_MODEL), "--task-file", str(TEST), "--scoring", "cloze"]


def _one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bayeslora: error:")]
    assert len(errors) == 1
    return errors[0]


@pytest.mark.parametrize(("argv", "message"), [
    (TRAIN_FLAGS + ["--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit exclude each other"),
    (TRAIN_FLAGS + ["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (EVALUATE_FLAGS + ["--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit exclude each other"),
    (EVALUATE_FLAGS + ["--dtype", "half"], "argument --dtype: invalid choice: 'half'"),
])
def test_bad_loading_flags_are_one_line_exit_2(tmp_path, capsys, argv, message):
    output = tmp_path / "out"
    assert main([*argv, "--output", str(output)]) == 2
    assert message in _one_error_line(capsys)
    assert not output.exists()


@pytest.mark.parametrize("argv", [TRAIN_FLAGS + ["--load-in-4bit"], EVALUATE_FLAGS + ["--load-in-8bit"]])
def test_quantisation_without_bitsandbytes_says_what_to_install(tmp_path, capsys, monkeypatch, argv):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "needs bitsandbytes: pip install 'bayeslora[quantization]'" in _one_error_line(capsys)


def test_a_yaml_quantisation_flag_must_be_a_boolean(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("load_in_4bit: maybe\n")
    assert main([*TRAIN_FLAGS, "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "load_in_4bit must be true or false, got 'maybe'" in _one_error_line(capsys)


def test_bf16_weights_train_fp32_factors_and_the_run_restores(tmp_path, capsys):
    run = tmp_path / "bf16"
    reference = train_run(run, "bayeslora", "--dtype", "bf16")
    assert json.loads((run / "method.json").read_text())["loading"] == {"dtype": "bf16", "quantization": None}
    restored = bayeslora.load_run(run)
    layer = next(m for m in restored.model.modules() if isinstance(m, BayesianFactors) and m.is_bayesian_adapter("default"))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    factor_dtypes = {p.dtype for p in layer.lora_A["default"].parameters()} | {p.dtype for p in layer.lora_B["default"].parameters()}
    assert factor_dtypes == {torch.float32}
    assert main(["evaluate", "--adapter", str(run), "--task-file", str(TEST), "--output", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert {k: again[k] for k in METRICS} == {k: reference[k] for k in METRICS}


# bitsandbytes runs its layers on CUDA, and (recent versions) on the CPU, 4-bit ones for inputs of at least
# its block size (64): the model here has hidden size 64. Without bitsandbytes the test is skipped.
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (bayeslora[quantization])")
@pytest.mark.parametrize(("flag", "layer_name"), [("--load-in-4bit", "Linear4bit"), ("--load-in-8bit", "Linear8bitLt")])
def test_quantised_base_trains_fp32_bayesian_factors_in_peft_bnb_layers_and_restores(tmp_path, flag, layer_name):
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb

    model_dir = tmp_path / "model64"
    make_tiny_llama(vocab_size=113, hidden_size=64).save_pretrained(model_dir)  # the fixture tokenizer's vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((FIXTURE_MODEL / name).read_bytes())
    run = tmp_path / "quantised"
    reference = train_run(run, "bayeslora", "--dtype", "bf16", flag, model=model_dir)
    restored = bayeslora.load_run(run)
    layer = next(m for m in restored.model.modules() if isinstance(m, BayesianFactors) and m.is_bayesian_adapter("default"))
    assert isinstance(layer, getattr(peft_bnb, layer_name)) and isinstance(layer.get_base_layer(), getattr(bnb.nn, layer_name))
    assert {p.dtype for p in layer.lora_A["default"].parameters()} == {torch.float32}
    assert main(["evaluate", "--adapter", str(run), "--task-file", str(TEST), "--output", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    if torch.cuda.is_available() or flag == "--load-in-8bit":
        assert {k: again[k] for k in METRICS} == {k: reference[k] for k in METRICS}
    else:
        # bitsandbytes' CPU 4-bit path repacks the weights on its first inference call and unpacks them whenever
        # a state_dict is taken (train's adapter save does); the round trip moves logits by ~1e-3 (measured)
        assert {k: again[k] for k in METRICS} == pytest.approx({k: reference[k] for k in METRICS}, rel=1e-3)
