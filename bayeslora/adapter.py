"""The Bayesian-LoRA model API: wrap, KL, sampling modes, save / load / export.

Everything here is a thin layer over peft: `get_bayeslora_model` is
`peft.get_peft_model` with a `BayesLoraConfig`, saving is peft's
`save_pretrained`; loading builds the adapter with peft from its saved config
and fills it with peft's `set_peft_model_state_dict`, after checking that the
weights file holds exactly the tensors that adapter has.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from bayeslora.adapter_source import adapter_file
from bayeslora.config import BayesLoraConfig, names_module
from bayeslora.errors import CorruptFileError
from bayeslora.files import write_files_atomically
from bayeslora.inducing import SAMPLING_MODES, InducingFactor, draw_weights, kl_terms
from bayeslora.kl_guard import note_kl_computed
from bayeslora.layer import BayesianFactors
from bayeslora.saved_files import check_tensors, read_json_object, read_tensors


def get_bayeslora_model(model: nn.Module, config: BayesLoraConfig, adapter_name: str = "default") -> PeftModel:
    """A peft model whose LoRA factors on `config.bayesian_modules` are inducing-weight factors."""
    if not isinstance(config, BayesLoraConfig):
        raise TypeError(f"config must be a BayesLoraConfig, got {type(config).__name__}")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _check_bayesian_targets(peft_model, config, adapter_name)
    return _draw_before_each_forward(peft_model)


def _draw_before_each_forward(peft_model: PeftModel) -> PeftModel:
    """Register the model-wide, shape-batched draw of all factors as a forward pre-hook of the base model."""
    base = peft_model.get_base_model()
    base.register_forward_pre_hook(lambda module, args: draw_all_factors(module))
    return peft_model


def factor_groups(model: nn.Module) -> list[list[InducingFactor]]:
    """The Bayesian factors of `model` grouped by signature (same shapes and settings), in module order."""
    groups: dict[tuple, list[InducingFactor]] = {}
    for factor in bayesian_factors(model):
        groups.setdefault(factor.signature(), []).append(factor)
    return list(groups.values())


def draw_all_factors(model: nn.Module) -> None:
    """Draw the weights of every factor for the next forward pass, one batched draw per group.

    Each factor keeps its weight until the next forward pass of the model (so that activation
    checkpointing recomputes with the same draw); held draws are kept as they are.
    """
    for group in factor_groups(model):
        first = group[0]
        if first.hold and all(factor.current_weight is not None for factor in group):
            continue
        for factor, weight in zip(group, draw_weights(group, first.mode, first.generator)):
            factor.current_weight = weight
            factor.drawn_by_model = True


def _check_bayesian_targets(peft_model: PeftModel, config: BayesLoraConfig, adapter_name: str) -> None:
    """Every Bayesian target got factors; every named Bayesian module matches a target."""
    lora_targets = {
        key: module
        for key, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    }
    for key, module in lora_targets.items():
        if config.is_bayesian_module(key) and not (
            isinstance(module, BayesianFactors) and module.is_bayesian_adapter(adapter_name)
        ):
            layer_type = type(module.get_base_layer()).__name__
            raise ValueError(f"module {key!r} is a {layer_type}, which cannot carry Bayesian factors (nn.Linear only)")
    if isinstance(config.bayesian_modules, list):
        for name in config.bayesian_modules:
            if not any(names_module(name, key) for key in lora_targets):
                raise ValueError(f"bayesian_modules entry {name!r} matches no LoRA target of the model")


def bayesian_factors(model: nn.Module) -> Iterator[InducingFactor]:
    return (module for module in model.modules() if isinstance(module, InducingFactor))


def is_bayesian(model: nn.Module) -> bool:
    return any(True for _ in bayesian_factors(model))


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Sum of KL(q || p) over all Bayesian factors of `model` (a scalar tensor with gradient)."""
    groups = factor_groups(model)
    if not groups:
        raise ValueError("the model has no Bayesian factors (was it built with get_bayeslora_model?)")
    note_kl_computed(factor for group in groups for factor in group)
    return torch.stack([kl_terms(group).sum() for group in groups]).sum()


@contextmanager
def sampling(model: nn.Module, mode: str = "sample", seed: int | None = None, hold: bool = False):
    """Set how every Bayesian factor of `model` draws its weight inside the block.

    mode "sample": a posterior draw per forward; "mean": the deterministic limit
    (lambda = 0, the inducing matrix at its mean, no flow noise). `seed` makes the
    draws reproducible (one generator per device, shared by the factors in call
    order); `hold=True` draws each factor once and reuses that draw for every
    forward in the block, so that several forward passes (a prompt and its answer
    choices, say) see the same posterior sample.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; valid modes: {', '.join(SAMPLING_MODES)}")
    factors = list(bayesian_factors(model))
    previous = [(factor.mode, factor.generator, factor.hold) for factor in factors]
    generators: dict[torch.device, torch.Generator] = {}
    for factor in factors:
        generator = None
        if seed is not None:
            device = factor.u_mean.device
            if device not in generators:
                generators[device] = torch.Generator(device=device).manual_seed(seed)
            generator = generators[device]
        factor.reset_sampling(mode, generator, hold)
    try:
        yield model
    finally:
        for factor, state in zip(factors, previous):
            factor.reset_sampling(*state)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _check_lora_schema(saved: dict, path: Path) -> None:
    """The saved LoRA settings that shape the weights have the types the code builds from (peft checks few)."""
    r = saved.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CorruptFileError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = saved.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CorruptFileError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    targets = saved.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(name, str) for name in targets)
    ):
        raise CorruptFileError(f"{path}: target_modules must be a module name pattern or a non-empty list of names, got {targets!r}")
    if saved.get("peft_type", "LORA") != "LORA":
        raise CorruptFileError(f"{path}: a {saved['peft_type']} adapter; only LoRA and Bayesian-LoRA adapters load")


def load_adapter_config(name_or_path: str | os.PathLike, **hub_options: Any) -> LoraConfig:
    """The adapter's settings, checked: a `BayesLoraConfig` when they have Bayesian settings, else a `LoraConfig`.

    `name_or_path`: a local folder or a Hub id (`adapter_source`; `hub_options` are passed on).
    """
    path = adapter_file(name_or_path, ADAPTER_CONFIG, **hub_options)
    saved = read_json_object(path)
    _check_lora_schema(saved, path)
    config_class = BayesLoraConfig if "bayesian_modules" in saved else LoraConfig
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    try:
        return config_class(**{key: value for key, value in saved.items() if key in known})
    except (TypeError, ValueError) as error:
        raise CorruptFileError(f"{path}: {str(error).strip().splitlines()[0]}") from None


def _adapter_and_weights(
    model: nn.Module, name_or_path: str | os.PathLike, adapter_name: str, is_trainable: bool, **hub_options: Any
) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """The adapter built on `model` from its saved config (fresh factors), and its weights file, verified against it."""
    config = load_adapter_config(name_or_path, **hub_options)
    config.inference_mode = not is_trainable
    try:
        if isinstance(config, BayesLoraConfig):
            peft_model = get_bayeslora_model(model, config, adapter_name)
        else:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as error:  # peft's "target modules not found", a Bayesian module that matches no target
        config_path = adapter_file(name_or_path, ADAPTER_CONFIG, **hub_options)
        raise CorruptFileError(f"{config_path}: {str(error).strip().splitlines()[0]}") from None
    pickled = Path(name_or_path).expanduser() / hub_options.get("subfolder", "") / "adapter_model.bin"
    if pickled.is_file() and not pickled.with_name(ADAPTER_WEIGHTS).is_file():
        raise CorruptFileError(f"{pickled}: pickle adapters are not read; re-save it as {ADAPTER_WEIGHTS} (peft's default)")
    weights = adapter_file(name_or_path, ADAPTER_WEIGHTS, **hub_options)
    tensors = read_tensors(weights)
    check_tensors(weights, tensors, expected_adapter_tensors(peft_model, adapter_name, tensors))
    return peft_model, tensors


def expected_adapter_tensors(peft_model: PeftModel, adapter_name: str, saved: Mapping[str, torch.Tensor]) -> dict:
    """What a saved adapter of `peft_model` must hold: peft's state dict of the adapter, except the posterior-mean
    `weight` of a Bayesian factor when `saved` lacks it (derived on saving for plain peft, never loaded; adapters
    saved before it was added do not have it)."""
    with whole_factor_vectors():
        expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    suffix = f".{adapter_name}"
    derived = {name.removesuffix(suffix) + ".weight" for name, module in peft_model.named_modules()
               if isinstance(module, InducingFactor) and name.endswith(suffix)}
    return {key: value for key, value in expected.items() if key not in derived or key in saved}


@contextmanager
def whole_factor_vectors() -> Iterator[None]:
    """Around peft's state-dict reads of a model whose tensors are whole (not ZeRO-3 / FSDP shards): peft (0.21.2
    on) warns about any 1-D tensor under lora_A, taking it for an ungathered shard, but a Bayesian factor's
    scales (`d_row_raw`, `z_row_rho`, `lambda_raw`, ...) are vectors and scalars by design. That warning only is
    silenced; a sharded model is gathered before it is saved (`experiment`), so there it is never true."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Adapter .*LoRA tensor\(s\) have invalid shape")
        yield


def check_adapter(name_or_path: str | os.PathLike, model_config: PretrainedConfig, **hub_options: Any) -> None:
    """Verify a saved adapter against a model's configuration without loading the model's weights.

    The model is built on the meta device (no memory, no weights), which is enough to know every tensor
    the adapter must hold; `evaluate` calls this before it loads anything.
    """
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about the skeleton's (empty) name and meta tensors
        _adapter_and_weights(AutoModelForCausalLM.from_config(model_config), name_or_path, "default", False, **hub_options)


def load_adapter(
    model: nn.Module,
    name_or_path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **hub_options: Any,
) -> PeftModel:
    """A saved adapter (plain peft LoRA or Bayesian-LoRA) on `model`, every tensor verified.

    The adapter is first built from its config with fresh factors, which says exactly which tensors the
    weights file must hold; the file is then read and checked (`saved_files.read_tensors`: nothing missing,
    nothing left over, shapes, finite values) before any value reaches the model. A mismatch is a
    `CorruptFileError` naming the file, never peft's warning over freshly initialised factors.
    `name_or_path` is a local folder or a Hub id, resolved as peft resolves it (`bayeslora.adapter_source`);
    `hub_options` (`subfolder`, `revision`, `token`, `cache_dir`) are passed on.
    """
    peft_model, weights = _adapter_and_weights(model, name_or_path, adapter_name, is_trainable, **hub_options)
    set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def load_bayeslora_model(model: nn.Module, name_or_path: str | os.PathLike, **options: Any) -> PeftModel:
    """Restore a Bayesian-LoRA adapter saved with `save_pretrained` onto a fresh base model (verified).

    `options` are `load_adapter`'s: `adapter_name`, `is_trainable` and the Hub options."""
    hub_options = {key: value for key, value in options.items() if key not in ("adapter_name", "is_trainable")}
    if not isinstance(load_adapter_config(name_or_path, **hub_options), BayesLoraConfig):
        raise CorruptFileError(f"adapter {str(name_or_path)!r} is not a Bayesian-LoRA adapter (no bayesian_modules setting)")
    return load_adapter(model, name_or_path, **options)


def export_mean_lora(model: PeftModel, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write a plain peft LoRA adapter holding the posterior-mean factors (loads with PeftModel.from_pretrained)."""
    config = model.peft_config[adapter_name]
    plain = LoraConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init})
    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (isinstance(module, LoraLayer) and adapter_name in module.lora_A):
                continue
            for part in ("lora_A", "lora_B"):
                factor = getattr(module, part)[adapter_name]
                weight = factor.mean_weight() if isinstance(factor, InducingFactor) else factor.weight
                state[f"{name}.{part}.weight"] = weight.detach().float().cpu().contiguous()

    def save(staging: Path) -> None:
        plain.save_pretrained(staging)
        save_file(state, staging / "adapter_model.safetensors")

    write_files_atomically(directory, save)
