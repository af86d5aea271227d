"""Which accelerate launches the training loop runs under, and what it needs under FSDP2 and DeepSpeed.

The loop reads whole adapter parameters outside the model's forward pass: the
Bayesian factors are drawn model-wide before each forward (a pre-hook of the
base model), and the KL, the divergence checks, the diagnostics and the saved
adapters read them directly. So:

- under FSDP the adapter is kept out of the sharding (accelerate's
  `ignored_modules`): FSDP2 shards the frozen base model, each process holds
  the whole adapter (and so the whole optimizer state), and the loop averages
  the adapter's gradients over processes itself, since FSDP does not reduce
  the gradients of parameters it ignores. FSDP1 is refused: the loop's
  validation runs the unwrapped module, whose root parameters FSDP1 keeps
  flattened and sharded.
- under DeepSpeed, ZeRO-1 and ZeRO-2 keep every parameter whole (they shard the
  optimizer state and gradients); ZeRO-3, which partitions the parameters, is
  refused. The engine steps the optimizer inside `backward` at the end of each
  accumulation, scales the loss and clips the gradients from its own config, so
  that config takes the loop's micro-batch, accumulation steps and clipping
  norm (`configure_deepspeed`); its bf16/fp16 modes, which cast every
  parameter (the Bayesian factors included), are refused, and so is a model
  with a 0-dimensional parameter (Bayesian-LoRA's lambda), which DeepSpeed's
  engine cannot broadcast.
- Megatron-LM is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn

from bayeslora.errors import UsageError

__all__ = ["adapter_modules", "average_gradients", "check_launch", "configure_deepspeed", "is_sharded", "prepare",
           "prepared_once"]

#: what `accelerate launch` sets to ask for each sharded type
_REQUESTED_BY = {"ACCELERATE_USE_FSDP": DistributedType.FSDP, "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED,
                 "ACCELERATE_USE_MEGATRON_LM": DistributedType.MEGATRON_LM}


def check_launch(state: AcceleratorState, environment: Mapping[str, str]) -> None:
    """Refuse (UsageError) a launch the loop does not run under, and one that accelerate did not set up as asked.

    `state` is the accelerator's (its distributed type, mixed precision, FSDP and DeepSpeed plugins);
    `environment` holds what `accelerate launch` set.
    Without an accelerator device accelerate turns an FSDP launch into plain DDP over CPU processes: that is
    refused rather than trained as something else than asked.
    """
    distributed_type, mixed_precision = state.distributed_type, state.mixed_precision
    fsdp_plugin, deepspeed_plugin = getattr(state, "fsdp_plugin", None), state.deepspeed_plugin
    for variable, requested in _REQUESTED_BY.items():
        if environment.get(variable, "false").lower() == "true" and distributed_type != requested:
            raise UsageError(f"launched for {requested.value}, but accelerate set up {distributed_type.value} "
                             "(it sets that up for processes on accelerator devices only)")
    if distributed_type == DistributedType.MEGATRON_LM:
        raise UsageError("bayeslora train does not run under MEGATRON_LM: launch it with FSDP (fsdp_version: 2), "
                         "DeepSpeed (ZeRO-1 or 2) or DDP")
    if distributed_type == DistributedType.DEEPSPEED:
        stage = deepspeed_plugin.get_value("zero_optimization.stage")
        if stage not in (0, 1, 2):
            raise UsageError(f"bayeslora train runs under DeepSpeed ZeRO-1 or 2, not ZeRO-{stage}, which partitions the "
                             "adapter's parameters: set zero_stage 2 (or shard the base model with FSDP2)")
        if mixed_precision != "no":
            raise UsageError(f"DeepSpeed's {mixed_precision} casts every parameter, the Bayesian factors included: launch "
                             "with mixed_precision no (the loop's --precision autocasts the base model)")
    if distributed_type != DistributedType.FSDP:
        return
    if fsdp_plugin.fsdp_version != 2:
        raise UsageError(f"bayeslora train runs under FSDP2 only, not FSDP{fsdp_plugin.fsdp_version}: set "
                         "fsdp_version: 2 in the accelerate config (or --fsdp_version 2)")
    if fsdp_plugin.cpu_ram_efficient_loading:
        # it moves the whole model, the adapter FSDP leaves whole included, to the meta device before sharding
        raise UsageError("bayeslora train does not run with fsdp_cpu_ram_efficient_loading: set it to false")


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the base model is sharded over the processes (FSDP2): its forward passes need every process."""
    return accelerator.distributed_type == DistributedType.FSDP


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that hold trainable parameters themselves (LoRA factors, Bayesian factors and their flows)."""
    return [module for module in model.modules() if any(p.requires_grad for p in module.parameters(recurse=False))]


def prepare(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int,
            grad_accum: int, max_grad_norm: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare(model, optimizer)` for one training: DDP, FSDP2 or DeepSpeed across processes (the same
    module on one process), and the optimizer that accelerate's state saving checkpoints (its only one).

    Under FSDP the adapter's modules are left unsharded, under DeepSpeed its config takes the loop's batch,
    accumulation and clipping (`configure_deepspeed`); `accelerator.backward` divides the loss by `grad_accum`.
    """
    accelerator.free_memory()  # a previous member's model and optimizer are not this one's to save or restore
    if is_sharded(accelerator):
        accelerator.state.fsdp_plugin.ignored_modules = adapter_modules(model)
    configure_deepspeed(accelerator, model, micro_batch, grad_accum, max_grad_norm)
    accelerator.gradient_accumulation_steps = grad_accum
    return accelerator.prepare(model, optimizer)


def prepared_once(accelerator: Accelerator) -> bool:
    """Whether accelerate wraps the model for good (FSDP2 shards it in place, DeepSpeed builds one engine), so that
    it cannot be prepared again for another member of an ensemble."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(accelerator: Accelerator, model: nn.Module, micro_batch: int, grad_accum: int,
                        max_grad_norm: float) -> None:
    """Before `accelerator.prepare` under DeepSpeed (a no-op otherwise): its config's micro-batch per process,
    accumulation steps, global batch and gradient clipping become the loop's. A value the config sets to something else than
    "auto" and the loop's is refused, and so is a model with a 0-dimensional parameter (Bayesian-LoRA's lambda):
    DeepSpeed's engine broadcasts every parameter viewed as bytes, which torch refuses for a 0-dimensional one."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    scalar = next((name for name, parameter in model.named_parameters() if parameter.dim() == 0), None)
    if scalar is not None:
        raise UsageError(f"DeepSpeed cannot broadcast the 0-dimensional parameter {scalar}: train this method "
                         "under FSDP2 or DDP")
    plugin = accelerator.state.deepspeed_plugin
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", grad_accum),
                       ("train_batch_size", micro_batch * grad_accum * accelerator.num_processes),
                       ("gradient_clipping", float(max_grad_norm))):
        configured = plugin.deepspeed_config.get(key, "auto")
        if configured not in ("auto", value):
            raise UsageError(f"the DeepSpeed config sets {key} to {configured}, this run needs {value} "
                             "(set it to auto, or change the run's settings)")
        plugin.deepspeed_config[key] = value


def average_gradients(parameters: Sequence[nn.Parameter], accelerator: Accelerator) -> None:
    """Replace each parameter's gradient by its mean over processes (one all-reduce); a missing gradient counts
    as zero, so every process takes part with the same tensors."""
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in parameters]), reduction="mean")
    for parameter, mean in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad.copy_(mean.view_as(parameter))
