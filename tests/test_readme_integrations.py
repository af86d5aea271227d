"""The README's "Use it from…" snippets for Trainer, SFTTrainer and lm-eval, run on the committed fixture model
(the base model's name becomes the fixture's folder; lm-eval runs a committed local task instead of arc_easy)."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import bayeslora
from bayeslora.models import load_model
from bayeslora.predictive import log_mean_exp
from bayeslora.scoring import Scorer
from bayeslora.tasks import load_task_file
from tests._integrations_support import FIXTURE, MODEL, fixture_bayeslora_model
from tests._integrations_support import fresh_accelerate_state  # noqa: F401 (an autouse fixture)
from tests.test_readme_snippets import snippets

ROOT = Path(__file__).resolve().parents[1]


def lm_eval_command() -> str:
    """The shell block after `<!-- snippet: lm-eval-command -->`, continuation lines joined."""
    block = re.search(r"<!-- snippet: lm-eval-command -->\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return block.group(1).replace("\\\n", " ")


def run_snippet(name: str, directory: Path) -> dict:
    """Execute a Python snippet in `directory` with the fixture model in place of SmolLM2; its variables."""
    code = snippets()[name].replace('"smollm2-135m"', repr(str(MODEL)))
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(code, f"README.md: {name}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_trainer_snippet_trains_logs_the_kl_and_restores(tmp_path):
    names = run_snippet("trainer", tmp_path)
    logged = [record for record in names["trainer"].state.log_history if "kl" in record]
    assert len(logged) == 2 and all(record["kl"] > 0 and record["loss"] > record["nll"] for record in logged)
    model, restored = names["model"].eval(), names["restored"]
    batch = names["tokenizer"](["Question: What is 3 plus 4?\nAnswer: 7"], return_tensors="pt")
    with torch.no_grad(), bayeslora.sampling(model, "mean"), bayeslora.sampling(restored, "mean"):
        assert torch.equal(model(**batch).logits, restored(**batch).logits)


def test_sft_snippet_trains_and_saves_a_bayeslora_adapter(tmp_path):
    pytest.importorskip("trl")
    names = run_snippet("sft", tmp_path)
    assert any("kl" in record for record in names["trainer"].state.log_history)
    adapter = tmp_path / "runs" / "sft" / "adapter"
    restored = bayeslora.load_bayeslora_model(load_model(str(MODEL))[0], adapter)
    assert bayeslora.is_bayesian(restored)


def test_lm_eval_command_scores_with_the_posterior_predictive(tmp_path, monkeypatch):
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    from bayeslora.integrations import lm_eval as integration

    class CommittedTasksOnly(lm_eval_tasks.TaskManager):
        """Skips indexing lm-eval's thousands of built-in task files (15 s), which this test does not use."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    model = fixture_bayeslora_model(prior_sd=1.0, lambda_init=0.3, max_lambda=0.3, sd_init=0.5, max_sd_u=1.0)
    model.save_pretrained(tmp_path / "adapter")
    command = (lm_eval_command().replace("smollm2-135m", str(MODEL))
               .replace("runs/trainer/adapter", str(tmp_path / "adapter")).replace("arc_easy", "bayeslora_arith"))
    arguments = shlex.split(command)[3:] + ["--include_path", "tests/fixtures/lm_eval", "--output_path", str(tmp_path / "out")]
    assert shlex.split(command)[:3] == ["python", "-m", "bayeslora.integrations.lm_eval"]
    monkeypatch.setattr(lm_eval_tasks, "TaskManager", CommittedTasksOnly)
    monkeypatch.setattr(sys, "argv", ["lm-eval", *arguments])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    integration.main()
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    lm_eval_accuracy = results["results"]["bayeslora_arith"]["acc,none"]

    # the reference: per draw, bayeslora's cloze scorer (sum normalisation); the choice with the highest
    # log-mean-exp over draws of its log-likelihood is lm-eval's pick
    samples = int(re.search(r"samples=(\d+)", command).group(1))
    restored, tokenizer = load_model(str(MODEL))
    restored = bayeslora.load_bayeslora_model(restored, tmp_path / "adapter")
    questions = load_task_file(FIXTURE / "arith_test.jsonl")
    scorer = Scorer(tokenizer, "cloze", normalization="sum")
    batch = scorer.collate(questions)
    with torch.no_grad():
        draws = []
        for sample in range(samples):
            with bayeslora.sampling(restored, "sample", seed=sample, hold=True):
                draws.append(scorer.choice_logits(restored, batch))
    picks = log_mean_exp(torch.stack(draws), dim=0).argmax(-1)
    assert lm_eval_accuracy == pytest.approx((picks == batch["answers"]).float().mean().item())
