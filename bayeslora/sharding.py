"""Which accelerate launches the training loop runs under, and what it needs under FSDP2.

The loop reads whole adapter parameters outside the model's forward pass: the
Bayesian factors are drawn model-wide before each forward (a pre-hook of the
base model), and the KL, the divergence checks, the diagnostics and the saved
adapters read them directly. So under FSDP the adapter is kept out of the
sharding (accelerate's `ignored_modules`): FSDP2 shards the frozen base model,
each process holds the whole adapter (and so the whole optimizer state), and
the loop averages the adapter's gradients over processes itself, since FSDP
does not reduce the gradients of parameters it ignores. FSDP1 is refused (the
loop's validation runs the unwrapped module, whose root parameters FSDP1 keeps
flattened and sharded), and so are DeepSpeed (its engine steps the optimizer
inside `backward` and counts accumulation itself; ZeRO-3 would partition the
factors) and Megatron-LM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from bayeslora.errors import UsageError

__all__ = ["adapter_modules", "average_gradients", "check_launch", "is_sharded", "keep_adapter_whole"]

#: what `accelerate launch` sets to ask for each sharded type
_REQUESTED_BY = {"ACCELERATE_USE_FSDP": DistributedType.FSDP, "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED,
                 "ACCELERATE_USE_MEGATRON_LM": DistributedType.MEGATRON_LM}


def check_launch(distributed_type: DistributedType, fsdp_plugin: FullyShardedDataParallelPlugin | None,
                 environment: Mapping[str, str]) -> None:
    """Refuse (UsageError) a launch the loop does not run under, and one that accelerate did not set up as asked.

    `fsdp_plugin` is accelerate's (None without FSDP); `environment` holds what `accelerate launch` set.
    Without an accelerator device accelerate turns an FSDP launch into plain DDP over CPU processes: that is
    refused rather than trained as something else than asked.
    """
    for variable, requested in _REQUESTED_BY.items():
        if environment.get(variable, "false").lower() == "true" and distributed_type != requested:
            raise UsageError(f"launched for {requested.value}, but accelerate set up {distributed_type.value} "
                             f"(it sets up {requested.value} on accelerator devices only, not on CPU processes)")
    if distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UsageError(f"bayeslora train does not run under {distributed_type.value}: launch it with FSDP "
                         "(fsdp_version: 2) or DDP")
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


def keep_adapter_whole(accelerator: Accelerator, model: nn.Module) -> None:
    """Before `accelerator.prepare`: FSDP leaves the adapter's modules unsharded (a no-op without FSDP)."""
    if is_sharded(accelerator):
        accelerator.state.fsdp_plugin.ignored_modules = adapter_modules(model)


def average_gradients(parameters: Sequence[nn.Parameter], accelerator: Accelerator) -> None:
    """Replace each parameter's gradient by its mean over processes (one all-reduce); a missing gradient counts
    as zero, so every process takes part with the same tensors."""
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in parameters]), reduction="mean")
    for parameter, mean in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad.copy_(mean.view_as(parameter))
