"""The training loop on a tiny random Llama: it learns, selects on validation only, resumes exactly, stops on NaN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import bayeslora
from bayeslora.checkpoint import latest_checkpoint, trainable_state
from bayeslora.diagnostics import posterior_state
from bayeslora.methods.base import Method
from bayeslora.experiment import split_validation
from bayeslora.train import TrainingDiverged, fit, task_loss
from bayeslora.methods import get_method
from bayeslora.scoring import Scorer
from bayeslora.tasks import Question, load_task_file
from bayeslora.train_settings import TrainSettings
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "bayeslora" / "tasks" / "fixtures" / "questions.jsonl"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than with threads contending for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyLoRA(Method):
    """Plain peft LoRA with a deterministic regulariser sum(theta^2) / n: a KL stand-in whose value does not
    depend on a posterior draw, so runs can be compared exactly."""

    name = "toy"

    def prepare(self, model, lora):
        return get_peft_model(model, LoraConfig(**lora))

    def regulariser(self, model, n_train, step_in_epoch=0, batches_per_epoch=1):
        return sum((p**2).sum() for p in model.parameters() if p.requires_grad) / n_train


def fixture_questions(n: int, seed: int = 0) -> list[Question]:
    """`n` variants of the committed fixture questions with their choices shuffled (learnable in cloze:
    the right answer's words)."""
    base = load_task_file(FIXTURE)
    generator = torch.Generator().manual_seed(seed)
    questions = []
    for index in range(n):
        question = base[index % len(base)]
        order = torch.randperm(len(question.choices), generator=generator).tolist()
        questions.append(Question(f"{question.id}-{index}", question.question,
                                  tuple(question.choices[i] for i in order), order.index(question.answer)))
    return questions


def tiny_scorer(mode: str = "cloze") -> Scorer:
    return Scorer(make_tiny_tokenizer(), mode)


def tiny_model(method: Method, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": dropout, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    return method.prepare(make_tiny_llama(), lora)


def settings(tmp_path: Path, **overrides) -> TrainSettings:
    values = dict(model="tiny", task="toy", output=str(tmp_path), batch_size=4, lr=1e-2, epochs=2,
                  validation_size=8, eval_batch_size=8, checkpoint_every=3, precision="fp32")
    values.update(overrides)
    return TrainSettings(**values)


def test_task_loss_matches_torch_references():
    logits = torch.tensor([[1.0, 2.0, 0.5, float("-inf")], [0.3, -1.0, 2.0, 0.0]])
    answers = torch.tensor([1, 2])
    loss, nll = task_loss(logits, answers, 0.0, 0.0)
    assert torch.allclose(nll, torch.nn.functional.cross_entropy(logits, answers))
    assert torch.allclose(loss, nll)
    # label smoothing spreads eps over the question's real choices only (torch's formula on 3 and 4 choices)
    smoothed, _ = task_loss(logits, answers, 0.1, 0.0)
    reference = torch.stack([
        torch.nn.functional.cross_entropy(logits[0:1, :3], answers[0:1], label_smoothing=0.1),
        torch.nn.functional.cross_entropy(logits[1:2], answers[1:2], label_smoothing=0.1),
    ]).mean()
    assert torch.allclose(smoothed, reference)
    bonus, _ = task_loss(logits, answers, 0.0, 0.05)
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean()
    assert torch.allclose(bonus, nll - 0.05 * entropy)


def test_validation_is_held_out_from_training_and_seeded():
    questions = fixture_questions(30)
    train, validation = split_validation(questions, 10, seed=3, limit=None)
    assert len(validation) == 10 and len(train) == 20
    assert not {q.id for q in train} & {q.id for q in validation}
    assert split_validation(questions, 10, seed=3, limit=None)[1] == validation
    assert split_validation(questions, 10, seed=4, limit=None)[1] != validation
    assert len(split_validation(questions, 10, seed=3, limit=7)[0]) == 7


def test_fit_lowers_training_nll_and_keeps_the_best_validation_epoch(tmp_path):
    train, validation = split_validation(fixture_questions(56), 8, seed=0, limit=None)
    model = tiny_model(ToyLoRA())
    s = settings(tmp_path, epochs=3)
    [result] = fit(model, tiny_scorer(), ToyLoRA(), train, validation, s, tmp_path, Accelerator(cpu=True))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 37))
    assert sum(r["nll"] for r in log[-6:]) / 6 < sum(r["nll"] for r in log[:6]) / 6 - 0.3
    # the logged KL is regulariser x N_train, the ELBO weight 1 / N_train
    assert all(r["kl"] > 0 and r["beta"] == 1.0 for r in log)
    assert all(r["loss"] == pytest.approx(r["nll"] + r["kl"] / len(train), rel=1e-5) for r in log)
    history = result.validation_history
    assert [h["step"] for h in history] == [12, 24, 36]
    best = min(history, key=lambda h: h["validation_nll"])
    assert result.best_step == best["step"]
    # the model ends with the best epoch's adapter, the one the last checkpoint holds as best
    saved = load_file(latest_checkpoint(tmp_path) / "best_adapter.safetensors")
    current = trainable_state(model)
    assert all(torch.equal(saved[name], current[name]) for name in saved)


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    train, validation = split_validation(fixture_questions(40), 8, seed=0, limit=None)
    # a learning rate this large makes the validation NLL worse after the first epoch
    s = settings(tmp_path, epochs=6, lr=3.0, max_grad_norm=0.0, early_stopping=1)
    [result] = fit(tiny_model(ToyLoRA()), tiny_scorer(), ToyLoRA(), train, validation, s, tmp_path, Accelerator(cpu=True))
    history = [h["validation_nll"] for h in result.validation_history]
    assert result.stopped_early and len(history) < 6
    assert history[-1] >= min(history[:-1])
    assert result.best_step == result.validation_history[history.index(min(history))]["step"]


class Interrupt(Exception):
    pass


class InterruptingScorer(Scorer):
    """Raises after `calls` training forwards, like a killed process."""

    def __init__(self, calls: int):
        super().__init__(make_tiny_tokenizer(), "cloze")
        self.calls = calls

    def choice_logits(self, model, batch):
        if model.training:
            self.calls -= 1
            if self.calls < 0:
                raise Interrupt
        return super().choice_logits(model, batch)


@pytest.mark.parametrize("method_name", ["mle", "bayeslora"])
def test_resume_after_an_interruption_gives_the_uninterrupted_adapter(tmp_path, method_name):
    method = get_method(method_name)
    train, validation = split_validation(fixture_questions(28), 8, seed=0, limit=None)
    # dropout / posterior draws make every step consume the RNG; linear decay makes the scheduler state matter
    s = dict(epochs=2, lora_dropout=0.1, lr_schedule="linear", warmup_steps=2, grad_accum=2, checkpoint_every=3)
    straight = tiny_model(method, dropout=0.1)
    fit(straight, tiny_scorer(), method, train, validation, settings(tmp_path / "a", **s), tmp_path / "a",
        Accelerator(cpu=True))

    interrupted = tiny_model(method, dropout=0.1)
    # 5 steps x 2 micro-batches per epoch: interrupt in step 8 (epoch 2), after the step-6 checkpoint
    with pytest.raises(Interrupt):
        fit(interrupted, InterruptingScorer(15), method, train, validation, settings(tmp_path / "b", **s),
            tmp_path / "b", Accelerator(cpu=True))
    assert latest_checkpoint(tmp_path / "b").name == "step-000006"
    # the checkpoint keeps the training time so far: at least the logged time of its six steps
    kept = json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())["train_seconds"]
    steps = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()][:6]
    assert kept >= sum(record["seconds"] for record in steps) > 0
    torch.manual_seed(1234)  # the resumed process starts from a different RNG state
    resumed = tiny_model(method, dropout=0.1)
    [result] = fit(resumed, tiny_scorer(), method, train, validation, settings(tmp_path / "b", **s), tmp_path / "b",
                   Accelerator(cpu=True), resume=True)
    assert (result.resumed_seconds, result.timed_from_step) == (kept, 0)

    expected, actual = trainable_state(straight), trainable_state(resumed)
    assert all(torch.allclose(expected[name], actual[name], atol=1e-6) for name in expected)
    log_a = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == list(range(1, 11))
    assert [r["nll"] for r in log_a] == pytest.approx([r["nll"] for r in log_b], abs=1e-6)



def test_a_checkpoint_without_a_kept_time_says_where_the_timing_starts(tmp_path, capsys):
    method = get_method("mle")
    train, validation = split_validation(fixture_questions(28), 8, seed=0, limit=None)
    s = settings(tmp_path, epochs=1, checkpoint_every=5)
    fit(tiny_model(method), tiny_scorer(), method, train, validation, s, tmp_path, Accelerator(cpu=True))
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    del state["train_seconds"]  # as written before checkpoints kept the time
    state_file.write_text(json.dumps(state))
    [result] = fit(tiny_model(method), tiny_scorer(), method, train, validation, s, tmp_path, Accelerator(cpu=True),
                   resume=True)
    assert (result.resumed_seconds, result.timed_from_step) == (0.0, state["step"])
    assert f"the checkpoint at step {state['step']} kept no training time" in capsys.readouterr().err

class NaNAfter(Scorer):
    def __init__(self, calls: int):
        super().__init__(make_tiny_tokenizer(), "cloze")
        self.calls = calls

    def choice_logits(self, model, batch):
        logits = super().choice_logits(model, batch)
        if model.training:
            self.calls -= 1
            if self.calls < 0:
                return logits * float("nan")
        return logits


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    train, validation = split_validation(fixture_questions(40), 8, seed=0, limit=None)
    with pytest.raises(TrainingDiverged, match="optimizer step 6: the loss is nan; the last good checkpoint .*step-000003 is kept"):
        fit(tiny_model(ToyLoRA()), NaNAfter(5), ToyLoRA(), train, validation, settings(tmp_path, checkpoint_every=3),
            tmp_path, Accelerator(cpu=True))
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-000003"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 3
    saved = load_file(checkpoint / "adapter.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_bayesian_run_logs_kl_beta_posterior_state_and_lr(tmp_path, scoring):
    # lambda below 1, so that the conditional part of the KL is not 0
    method = get_method("bayeslora", inducing_rows=3, inducing_cols=3, lambda_init=0.3, max_lambda=0.3)
    train, validation = split_validation(fixture_questions(24), 8, seed=0, limit=None)
    model = tiny_model(method)
    s = settings(tmp_path, epochs=1, kl_warmup=4, beta=0.5, lr_schedule="linear")
    fit(model, tiny_scorer(scoring), method, train, validation, s, tmp_path, Accelerator(cpu=True))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in log] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert [r["lr"] for r in log] == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2])
    assert all(r["kl"] > 0 for r in log)
    state = posterior_state(model)
    for key in ("lambda_mean", "lambda_max", "sd_mean", "sd_max"):
        assert log[-1][key] == pytest.approx(state[key])
    assert log[-1]["relative_update"] == pytest.approx(state["relative_update"])
    # the KL parts add up to the logged KL (the flow part is a one-sample estimate: same order, not equal)
    for r in log:
        assert r["kl_per_example"] == pytest.approx(r["kl"] / len(train))
        assert r["kl_conditional_per_example"] > 0 and r["kl_inducing_per_example"] > 0
    validation = [r["validation"] for r in log if "validation" in r]
    assert len(validation) == 1 and validation[0]["mutual_information"] >= 0 and validation[0]["draw_spread"] >= 0
    # loss = NLL + beta * KL / N_train, from the same draw
    assert all(r["loss"] == pytest.approx(r["nll"] + r["beta"] * r["kl"] / len(train), rel=1e-5) for r in log)


def test_select_epoch_last_keeps_the_last_adapter_and_validates_once(tmp_path):
    method = get_method("mle")
    train, validation = split_validation(fixture_questions(40), 8, seed=0, limit=None)
    model = tiny_model(method)
    fit(model, tiny_scorer("letter"), method, train, validation, settings(tmp_path, epochs=3, select_epoch="last"),
        tmp_path, Accelerator(cpu=True))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "validation" in r] == [log[-1]["step"]]
    checkpoint = latest_checkpoint(tmp_path)
    last = load_file(checkpoint / "adapter.safetensors")
    current = trainable_state(model)
    assert all(torch.equal(last[name], current[name]) for name in current)


def test_bayeslora_dropout_at_evaluation_switches_lora_dropout_on_inside_draws_only():
    method = get_method("bayeslora", dropout_at_evaluation=True, inducing_rows=3, inducing_cols=3)
    model = method.prepare(make_tiny_llama(), dict(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"]))
    model.eval()
    dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n and isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for draw in method.draws(model, 2, seed=0):
        with draw:
            assert all(module.training for module in dropouts)
    assert not any(module.training for module in dropouts)
    for draw in get_method("bayeslora").draws(model, 1):
        with draw:
            assert not any(module.training for module in dropouts)


def test_bayeslora_scales_move_at_their_own_learning_rate(tmp_path):
    """Adam's first step moves every parameter by about its group's lr: 10 x lr for lambda and the q0 sds."""
    method = get_method("bayeslora", inducing_rows=3, inducing_cols=3, lambda_init=0.5, max_lambda=0.9,
                        max_sd_u=0.9)
    train, validation = split_validation(fixture_questions(12), 4, seed=0, limit=None)
    model = tiny_model(method)
    factor = next(bayeslora.adapter.bayesian_factors(model))
    before = {name: p.detach().clone() for name, p in factor.named_parameters()}
    fit(model, tiny_scorer("letter"), method, train, validation, settings(tmp_path, max_steps=1, max_grad_norm=0.0),
        tmp_path, Accelerator(cpu=True))
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in factor.named_parameters()}
    assert moved["lambda_raw"] == pytest.approx(0.1, rel=0.05) and moved["u_sd_raw"] == pytest.approx(0.1, rel=0.05)
    assert moved["u_mean"] == pytest.approx(0.01, rel=0.05)


def test_a_collapsed_posterior_warns_once_with_its_scales(tmp_path, capsys):
    """At the published constants the draws do not disagree: one warning line, however many validations."""
    method = get_method("bayeslora", constants="paper", inducing_rows=3, inducing_cols=3)
    train, validation = split_validation(fixture_questions(24), 8, seed=0, limit=None)
    fit(tiny_model(method), tiny_scorer("letter"), method, train, validation, settings(tmp_path, epochs=3),
        tmp_path, Accelerator(cpu=True))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "posterior has collapsed" in line]
    assert len(warnings) == 1 and "lambda mean 0.001" in warnings[0]
