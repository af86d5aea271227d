"""The result scripts under scripts/: each one's computation against an independent reference."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bayeslora
from bayeslora.models import load_model

MODEL = str(Path(__file__).resolve().parent.parent / "bayeslora" / "fixtures" / "smoke" / "model")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bootstrap_errors_of_a_mean_metric_match_its_analytic_standard_error():
    # the Brier score is a mean over questions: its standard error is std / sqrt(N), paired or not
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (400,), generator=generator)
    probs = torch.softmax(2 * torch.randn(400, 4, generator=generator), dim=-1)
    reference = torch.softmax(2 * torch.randn(400, 4, generator=generator), dim=-1)

    def per_question(p):
        return ((p.double() - torch.nn.functional.one_hot(labels, 4)) ** 2).sum(-1)

    bootstrap = _script("bootstrap_metrics").bootstrap
    (value, error), = [stats["brier"] for stats in bootstrap(probs, labels, 2000, 0)]
    assert value == pytest.approx(per_question(probs).mean().item())
    assert error == pytest.approx((per_question(probs).std() / 20).item(), rel=0.1)
    own, paired = bootstrap(probs, labels, 2000, 0, reference)
    assert own["brier"] == bootstrap(probs, labels, 2000, 0)[0]["brier"]  # the same question sets with or without
    difference, error = paired["brier"]
    assert difference == pytest.approx((per_question(probs) - per_question(reference)).mean().item())
    assert error == pytest.approx(((per_question(probs) - per_question(reference)).std() / 20).item(), rel=0.1)


def test_error_detection_groups_seeds_and_ranks_the_wrong_answers(tmp_path, capsys, monkeypatch):
    def write(folder, rows):
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def row(gold, probabilities, information):
        return {"gold": gold, "predicted": max(range(2), key=probabilities.__getitem__),
                "probabilities": probabilities, "mutual_information": information}

    # seed 1: the two wrong answers are the least confident and disagree most (AUROC 1 by either);
    # seed 2: its wrong answer (1 - 0.75) ranks above one right answer (1 - 0.9) and below the other (1 - 0.7),
    # AUROC 1/2, and its draws never disagree (a deterministic model), so the group has no MI column
    write(tmp_path / "m" / "seed-1", [row(1, [0.6, 0.4], 0.3), row(1, [0.55, 0.45], 0.2),
                                      row(0, [0.9, 0.1], 0.1), row(0, [0.8, 0.2], 0.0)])
    write(tmp_path / "m" / "seed-2", [row(1, [0.75, 0.25], 0.0), row(0, [0.7, 0.3], 0.0), row(0, [0.9, 0.1], 0.0)])
    monkeypatch.setattr("sys.argv", ["error_detection", str(tmp_path / "m" / "seed-1"), str(tmp_path / "m" / "seed-2")])
    _script("error_detection").main()
    table = capsys.readouterr().out.splitlines()
    spread = torch.tensor([1.0, 0.5], dtype=torch.float64).std().item()
    assert table[2] == f"| {tmp_path / 'm'} | 2 | 3, 4 | 0.750 ± {spread:.3f} | - |"


def test_prior_control_sets_the_chosen_factors_exactly_to_their_prior(tmp_path):
    torch.manual_seed(0)
    config = bayeslora.BayesLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                       bayesian_modules=["q_proj", "v_proj"], noise_scales=True)
    bayeslora.get_bayeslora_model(load_model(MODEL)[0], config).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    # a posterior away from the prior in every parameter the control resets
    save_file({name: value + 0.3 * torch.randn_like(value) if name.endswith(("u_mean", "u_sd_raw", "lambda_raw", "noise_row_raw", "noise_col_raw"))
               or ".flow.output_layer." in name else value for name, value in load_file(weights).items()}, weights)
    script = _script("prior_control")
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    posterior = load_file(weights)
    tensors, replaced = script.to_prior(posterior, adapter_config, ["q_proj"])
    save_file(tensors, weights)

    model = bayeslora.load_bayeslora_model(load_model(MODEL)[0], tmp_path)
    def factors_of(module):
        return [f for n, f in model.named_modules() if isinstance(f, bayeslora.InducingFactor) and module in n]

    q_factors, v_factors = factors_of("q_proj"), factors_of("v_proj")
    # mean, sd, lambda, the noise scales per row and per column, the flow output's weight and bias
    assert replaced == 7 * len(q_factors)
    assert all(abs(factor.kl_divergence().item()) < 1e-3 for factor in q_factors)
    assert all(factor.kl_divergence().item() > 1 for factor in v_factors)  # left as they were
    # a prior draw of W is N(0, sigma_p^2 I): its entries' variance is sigma_p^2
    factor = q_factors[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([factor.sample_weight(generator) for _ in range(400)])
    assert draws.mean().item() == pytest.approx(0, abs=0.05 * factor.prior_scale)
    assert draws.var().item() == pytest.approx(factor.prior_scale ** 2, rel=0.05)
    with pytest.raises(ValueError, match="o_proj: not Bayesian modules"):
        script.to_prior(load_file(weights), adapter_config, ["o_proj"])
    # a learned conditional prior scale (empirical Bayes) is the prior's own: it stays, only q(U) goes to p(U)
    learned = {**adapter_config, "learn_prior_lambda": True}
    tensors, replaced = script.to_prior(posterior, learned, ["q_proj"])
    assert replaced == 6 * len(q_factors)
    lambdas = [name for name in posterior if name.endswith("lambda_raw")]
    assert lambdas and all(torch.equal(posterior[name], tensors[name]) for name in lambdas)


def test_data_information_rebuilds_the_run_s_initial_adapter(tmp_path, monkeypatch):
    """A run whose adapter cannot move (lr 1e-12) saves its initialisation: `--at init`, which rebuilds the adapter
    from run.json and the seed, must give the Fisher information of `--at trained`, which loads the saved one."""
    from bayeslora.cli import main as bayeslora_main
    from tests.test_train_cli import write_questions
    from tests.test_train_loop import fixture_questions

    questions = write_questions(tmp_path / "train.jsonl", fixture_questions(12))
    run = tmp_path / "run"
    assert bayeslora_main(["train", "--model", MODEL, "--task-file", str(questions), "--method", "bayeslora",
                           "--scoring", "cloze", "--max-steps", "1", "--batch-size", "4", "--validation-size", "4",
                           "--lr", "1e-12", "--seed", "3", "--precision", "fp32", "--output", str(run)]) == 0
    script = _script("data_information")
    for draws in (0, 2):  # at the deterministic point, and averaged over posterior draws
        numbers = {}
        for at in ("init", "trained"):
            output = tmp_path / f"{at}-{draws}.json"
            monkeypatch.setattr("sys.argv", ["data_information.py", str(run), "--at", at, "--draws", str(draws),
                                             "--json", str(output)])
            script.main()
            numbers[at] = json.loads(output.read_text())
        assert numbers["init"]["n_questions"] == 8  # the 12 questions less the 4 held out for validation
        assert numbers["init"]["draws"] == numbers["trained"]["draws"] == draws
        init, trained = numbers["init"]["factors"], numbers["trained"]["factors"]
        assert init.keys() == trained.keys() and init
        for name in init:
            assert init[name]["trace_mean"] > 0
            for key in ("trace_mean", "trace_max", "entry_max"):
                assert init[name][key] == pytest.approx(trained[name][key], rel=1e-4, abs=0)  # the numbers are tiny


def test_data_information_refuses_a_run_without_inducing_weights_or_saved_adapter(tmp_path, monkeypatch, capsys):
    script = _script("data_information")
    units = Path(__file__).resolve().parents[1] / "docs/results/calibration-smollm2/grid/runs/arc_easy"
    for method, at, message in (("mle", "init", "is a mle run"), ("bayeslora", "trained", "holds no saved adapter")):
        run = tmp_path / method  # the unit's settings without its weights, as a fresh checkout has it
        run.mkdir()
        (run / "run.json").write_text((units / method / "seed-1" / "run.json").read_text())
        monkeypatch.setattr("sys.argv", ["data_information.py", str(run), "--at", at])
        with pytest.raises(SystemExit):
            script.main()
        assert message in capsys.readouterr().err
