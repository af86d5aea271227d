"""mle, map, mcdropout, ensemble: the plain-LoRA baselines, and the registry."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from bayeslora.errors import UsageError
from bayeslora.methods import METHODS, get_method
from tests._methods_support import LORA, choice_logits, draw_logits, fit, nll, toy_batches
from tests.conftest import make_tiny_llama


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert {"mle", "map", "mcdropout", "ensemble", "blob", "laplace", "laplace_last", "temperature", "tfb", "bayeslora"} <= set(METHODS)
    with pytest.raises(UsageError, match="unknown method 'lora'.*valid methods: bayeslora, blob"):
        get_method("lora")


def test_mle_is_plain_peft_lora_and_training_lowers_nll():
    method = get_method("mle")
    model = method.prepare(make_tiny_llama(0), dict(LORA))
    torch.manual_seed(0)
    reference = get_peft_model(make_tiny_llama(0), LoraConfig(task_type="CAUSAL_LM", **LORA))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n, p in reference.named_parameters() if p.requires_grad
    )
    batches = toy_batches()
    before = nll(model, batches)
    trained = fit(method, batches, model=model)
    assert nll(trained, batches) < before - 0.3
    assert method.weight_decay == 0.0 and get_method("map").weight_decay == 0.01
    assert get_method("map", weight_decay=0.1).weight_decay == 0.1


def test_mcdropout_draws_are_seeded_masks_on_the_lora_branch_only():
    method = get_method("mcdropout")
    model = fit(method, toy_batches(), steps=10)
    batch = toy_batches(1, seed=1)[0]
    draws = draw_logits(method, model, batch, n_samples=3, seed=5)
    assert not torch.allclose(draws[0], draws[1])
    repeat = draw_logits(method, model, batch, n_samples=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(draws, repeat))
    # outside a draw the model is deterministic, and with the adapter disabled the draws vanish
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(choice_logits(model, batch), choice_logits(model, batch))
        with model.disable_adapter():
            base = choice_logits(model, batch)
            assert all(torch.equal(base, d) for d in draw_logits(method, model, batch, n_samples=2))
    dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert dropouts and all(m.p == 0.1 for m in dropouts)


def test_ensemble_members_train_independently_and_predict_as_separate_adapters():
    method = get_method("ensemble", members=3)
    batches = toy_batches()
    model = fit(method, batches, steps=15)
    state = model.state_dict()
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.{}.weight"
    members = [state[name.format(f"member_{i}")] for i in range(3)]
    assert all(m.abs().sum() > 0 for m in members)  # each member was trained (B starts at zero)
    assert not torch.allclose(members[0], members[1]) and not torch.allclose(members[1], members[2])
    # reference: each member copied into its own single-adapter peft model
    batch = toy_batches(1, seed=1)[0]
    draws = draw_logits(method, model, batch, n_samples=99)
    assert len(draws) == 3
    for index, member in enumerate(method.members(model)):  # while a member trains, it alone is drawn
        with member:
            alone = draw_logits(method, model, batch, n_samples=99)
            assert len(alone) == 1 and torch.equal(alone[0], draws[index])
    for index, drawn in enumerate(draws):
        single = get_peft_model(make_tiny_llama(0), LoraConfig(task_type="CAUSAL_LM", **LORA)).eval()
        single.load_state_dict(
            {k.replace(f".member_{index}.", ".default."): v for k, v in state.items() if f".member_{index}." in k},
            strict=False,
        )
        with torch.no_grad():
            assert torch.allclose(drawn, choice_logits(single, batch), atol=1e-5)


def test_ensemble_rejects_zero_members():
    with pytest.raises(UsageError, match="members must be at least 1, got 0"):
        get_method("ensemble", members=0)


def test_bayeslora_decays_plain_lora_factors_only():
    """Weight decay on the variational parameters would change the objective away from the ELBO."""
    method = get_method("bayeslora", bayesian_modules=["q_proj"])
    model = method.prepare(make_tiny_llama(0), {**LORA, "target_modules": ["q_proj", "v_proj"]})
    groups = method.parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    undecayed = {names[id(p)] for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    assert decayed and all("v_proj" in name for name in decayed)
    assert undecayed and all("q_proj" in name for name in undecayed)
    assert decayed | undecayed == {n for n, p in model.named_parameters() if p.requires_grad}
    asked = get_method("bayeslora", posterior_weight_decay=0.03)
    assert {g["weight_decay"] for g in asked.parameter_groups(asked.prepare(make_tiny_llama(0), dict(LORA)))} >= {0.03}


def test_bayeslora_keeps_a_plain_lora_path_next_to_bayesian_q_proj_and_lm_head_by_default():
    from bayeslora.inducing import InducingFactor

    def bayesian_targets(model):
        return sorted({n.split(".")[-3] for n, m in model.named_modules() if isinstance(m, InducingFactor)})

    method = get_method("bayeslora")
    assert bayesian_targets(method.prepare(make_tiny_llama(0), dict(LORA))) == ["q_proj"]
    only_v = {**LORA, "target_modules": ["v_proj"]}
    assert bayesian_targets(method.prepare(make_tiny_llama(0), only_v)) == ["v_proj"]
    released = {**LORA, "target_modules": ["q_proj", "v_proj", "lm_head"]}  # the released code's targets
    assert bayesian_targets(method.prepare(make_tiny_llama(0), released)) == ["lm_head", "q_proj"]
    both = get_method("bayeslora", bayesian_modules=["q_proj", "v_proj"])
    assert bayesian_targets(both.prepare(make_tiny_llama(0), dict(LORA))) == ["q_proj", "v_proj"]


def test_bayeslora_learning_rate_multipliers_reach_their_parameters():
    """lambda and the q0 sds move at `scale_lr` x lr, the whitened inducing means at `mean_lr` x lr, the rest at lr."""
    method = get_method("bayeslora", scale_lr=10.0, mean_lr=3.0)
    model = method.prepare(make_tiny_llama(0), dict(LORA))
    names = {id(p): n for n, p in model.named_parameters()}
    scaled = {names[id(p)]: group.get("lr_scale", 1.0) for group in method.parameter_groups(model) for p in group["params"]}
    assert scaled and set(scaled) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, lr_scale in scaled.items():
        leaf = name.rsplit(".", 1)[-1]
        expected = 10.0 if leaf in ("u_sd_raw", "lambda_raw") else 3.0 if leaf == "u_mean" else 1.0
        assert lr_scale == expected, name
