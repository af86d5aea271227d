"""`bayeslora inspect RUN`: the posterior's state of a saved run, and a one-line verdict."""

from __future__ import annotations

import json

from bayeslora.cli import main
from bayeslora.presets import FIXTURE_MODEL
from tests.test_train_loop import one_thread  # noqa: F401 (fixture)


def test_inspect_prints_the_posterior_of_a_trained_run(tmp_path, capsys):
    output = tmp_path / "run"
    config = tmp_path / "run.yaml"  # scales at which draws disagree, whatever the library's defaults
    config.write_text("method_options: {prior_sd: 1.0, lambda_init: 0.3, max_lambda: 0.3, sd_init: 0.5, max_sd_u: 1.0}\n")
    assert main(["train", "--config", str(config), "--model", str(FIXTURE_MODEL), "--task", "smoke_arith", "--method", "bayeslora",
                 "--scoring", "cloze", "--max-steps", "2", "--batch-size", "4", "--r", "4", "--lr", "1e-2",
                 "--limit-validation", "8", "--limit-eval", "8", "--precision", "fp32", "--no-zero-shot",
                 "--output", str(output)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(output)]) == 0
    printed = capsys.readouterr().out
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    results = json.loads((output / "results.json").read_text())
    for label in ("lambda mean", "inducing sd max", "KL / example, conditional", "||dW|| / ||W||, q_proj", "validation",
                  "draw variance from q(U), q_proj.lora_A"):
        assert label in printed
    assert f"{log[-1]['lambda_mean']:.3g}" in printed
    assert f"{log[-1]['inducing_variance_share']['q_proj.lora_B']:.3g}" in printed
    verdict = printed.strip().splitlines()[-1]
    assert verdict.startswith("the draws disagree: evaluation mutual information")
    assert f"{results['mutual_information']:.3g}" in verdict


def test_inspect_says_when_the_posterior_is_a_point(tmp_path, capsys):
    record = {"step": 1, "epoch": 1, "nll": 1.0, "lambda_mean": 1e-3, "sd_mean": 1e-3,
              "validation": {"validation_nll": 1.0, "mutual_information": 2e-8}}
    (tmp_path / "train_log.jsonl").write_text(json.dumps(record) + "\n")
    history = [{"step": 1, "epoch": 1, "validation_nll": 1.0, "mutual_information": 2e-8, "draw_spread": 0.0}]
    (tmp_path / "training.json").write_text(json.dumps({"members": [{"validation_history": history}]}))
    assert main(["inspect", str(tmp_path)]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("the posterior is a point: last validation mutual information 2.0e-08")


def test_inspect_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no train_log.jsonl" in capsys.readouterr().err
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2, "nl')
    assert main(["inspect", str(tmp_path)]) == 2
    assert "train_log.jsonl:2: not a JSON record" in capsys.readouterr().err
