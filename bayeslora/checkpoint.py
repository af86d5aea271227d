"""The run directory: who may write into it, and atomic checkpoints for `--resume`.

Layout of a run directory:
```
run.json                   the settings that define the run (refuses a different run)
train_log.jsonl            one line per optimizer step
checkpoints/latest         name of the newest complete checkpoint (replaced atomically)
checkpoints/step-000050/   adapter.safetensors, best_adapter.safetensors (trainable
                           parameters, written by the main process), scheduler.pt
                           (torch.save of its state dict, read back with weights_only=True),
                           state.json (step, processes, distributed type, selection state, training seconds so far),
                           accelerate/ (`Accelerator.save_state`: the whole optimizer state,
                           every process's random-number generators; under FSDP also the
                           base model's shards, under DeepSpeed its engine's checkpoint)
adapter_config.json, adapter_model.safetensors   the final adapter (peft format)
results.json, predictions.jsonl, reliability.png the evaluation (zero_shot/ for the base model)
.lock                      held by the process writing here (`output_dir.output_lock`)
```
A checkpoint is written into a temporary folder, renamed into place, and only
then named in `latest`; older checkpoints are deleted afterwards. A crash at any
moment leaves the previous checkpoint intact. Every staging name starts with
".", so the next start can remove what an interrupted write left behind.
Reading a checkpoint back checks every file first (`saved_files`).

The optimizer goes through accelerate's state saving so that a sharded launch
(FSDP, DeepSpeed) writes all of it, not the main process's part; without them
accelerate would also write the whole model, which `_without_model_weights`
leaves out (the adapter files hold what training changes). The scheduler stays
in our own file: accelerate's prepared scheduler steps once per process unless
the Accelerator is built for it, and its registered objects are read back
without weights_only.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME
from safetensors.torch import save as safetensors_bytes
from torch import nn

from bayeslora.errors import CorruptFileError, UsageError
from bayeslora.files import write_atomically
from bayeslora.output_dir import check_writable, empty_folder, holds_files, remove_stale_temporaries
from bayeslora.saved_files import read_json_object, read_tensors, read_torch_state

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
#: what `state.json` of every checkpoint holds (written by the training loop)
STATE_KEYS = {"step", "processes", "distributed_type", "best_step", "best_validation_nll", "epochs_without_improvement",
              "stopped_early", "validation_history"}
#: the folder of a checkpoint that `Accelerator.save_state` writes
ACCELERATE_STATE = "accelerate"


def check_output_dir(output: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Refuse (UsageError) to write where it would clobber something; writes nothing.

    Called before anything is loaded, and again once the folder's lock is held (another run may have
    started in between).
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    check_writable(output)
    if not holds_files(output):
        if resume:
            raise UsageError(f"nothing to resume: {output} holds no run")
        return
    run_file = output / RUN_FILE
    if not run_file.is_file():
        raise UsageError(f"output {output} holds files that are not a bayeslora run; choose an empty or new directory")
    try:
        previous = read_json_object(run_file)
    except CorruptFileError as error:
        if overwrite:
            return
        raise CorruptFileError(f"{error}; pass --overwrite to start the run again") from None
    if resume:
        differences = [key for key in sorted(set(previous) | set(identity)) if previous.get(key) != identity.get(key)]
        if differences:
            key = differences[0]
            raise UsageError(f"cannot resume {output}: {key} was {previous.get(key)!r}, now {identity.get(key)!r}")
        for pointer in output.glob(f"**/{CHECKPOINTS}/latest"):  # an ensemble's are in its member folders
            check_checkpoint_files(latest_checkpoint(pointer.parent.parent))  # damage is reported before anything loads
    elif not overwrite:
        if previous != identity:
            raise UsageError(f"output {output} holds a different run; pass --overwrite to replace it")
        state = "checkpointed" if has_checkpoint(output) else "no checkpoint yet"
        raise UsageError(f"output {output} holds the same run ({state}); pass --resume to continue it "
                         f"or --overwrite to replace it")


def start_run_dir(output: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Record the run in its directory (emptied first with `overwrite`); call with the folder's lock held,
    after `check_output_dir`. Staging files of interrupted writes are removed."""
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        empty_folder(output)
    remove_stale_temporaries(output)
    if not resume:
        write_atomically(output / RUN_FILE, json.dumps(identity, indent=1, sort_keys=True).encode())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapter), detached copies on CPU."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters; names must match exactly."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        missing = sorted(set(parameters) ^ set(state))
        raise UsageError(f"checkpoint does not match the model's adapter (first mismatch: {missing[0]})")
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def has_checkpoint(output: Path) -> bool:
    """Whether the run in `output` has a checkpoint to resume from (an ensemble's are in its member folders)."""
    return any(output.glob(f"**/{CHECKPOINTS}/latest"))


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint of the run in `output`, or None before the first one."""
    pointer = output / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    folder = output / CHECKPOINTS / name
    if not name.startswith("step-") or "/" in name or not folder.is_dir():
        raise CorruptFileError(f"{pointer}: names no checkpoint of this run ({name[:40]!r}); "
                               f"the run cannot continue: pass --overwrite to start it again")
    return folder


@contextmanager
def _without_model_weights(accelerator) -> Iterator[None]:
    """accelerate's state saving leaves out the whole-model weights it would write (and read) without FSDP:
    the checkpoint's adapter files hold the trainable parameters."""
    handles = [accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear()),
               accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _deepspeed_options(accelerator, **options: Any) -> dict[str, Any]:
    """`options` for DeepSpeed's engine under DeepSpeed (accelerate passes them on to it), none otherwise."""
    return options if accelerator.distributed_type == DistributedType.DEEPSPEED else {}


def save_checkpoint(
    output: Path,
    accelerator,
    model: nn.Module,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    best_adapter: dict[str, torch.Tensor] | None,
) -> None:
    """Write a checkpoint for optimizer step `state["step"]` atomically (all processes call this).

    The optimizer prepared by `accelerator` (its only one) and every process's random-number generators go
    through `Accelerator.save_state`.
    """
    folder = output / CHECKPOINTS
    name = f"step-{state['step']:06d}"
    temporary = folder / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _without_model_weights(accelerator):
        # DeepSpeed's engine saves its module with the optimizer's shards: without the frozen base model
        accelerator.save_state(temporary / ACCELERATE_STATE, **_deepspeed_options(accelerator, exclude_frozen_parameters=True))
    if accelerator.is_main_process:
        write_atomically(temporary / "adapter.safetensors", safetensors_bytes(trainable_state(model)))
        if best_adapter is not None:
            write_atomically(temporary / "best_adapter.safetensors", safetensors_bytes(best_adapter))
        write_atomically(temporary / "scheduler.pt", _torch_bytes(scheduler.state_dict()))
        write_atomically(temporary / "state.json", json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(temporary, folder / name)
        write_atomically(folder / "latest", name.encode())
        for old in folder.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(
    output: Path,
    accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore the newest checkpoint into model/optimizer/scheduler/RNG; returns (state, best adapter).

    Call after `accelerator.prepare(model, optimizer)`. Every file is read and
    checked before anything is restored (`saved_files`): adapters hold exactly the model's trainable tensors,
    finite; the checkpoint was written by as many processes, under the same distributed type; optimizer and
    scheduler states match this run.
    """
    folder = latest_checkpoint(output)
    check_checkpoint_files(folder)
    state = _read_state(folder)
    written, now = (state["processes"], state["distributed_type"]), (accelerator.num_processes, accelerator.distributed_type.value)
    if written != now:
        raise UsageError(f"the checkpoint was written by {written[0]} processes under {written[1]}, "
                         f"this run has {now[0]} under {now[1]}")
    expected = trainable_state(model)
    adapter = read_tensors(folder / "adapter.safetensors", expected)
    best_file = folder / "best_adapter.safetensors"
    best = read_tensors(best_file, expected) if best_file.is_file() else None
    scheduler_state = read_torch_state(folder / "scheduler.pt")
    try:
        with _without_model_weights(accelerator):
            accelerator.load_state(folder / ACCELERATE_STATE, **_deepspeed_options(accelerator, load_module_strict=False))
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CorruptFileError(f"{folder}: does not match this run ({type(error).__name__}: {error})") from None
    _check_optimizer_shapes(optimizer, folder / ACCELERATE_STATE)
    load_trainable_state(model, adapter)
    return state, best


def _read_state(folder: Path) -> dict[str, Any]:
    state = read_json_object(folder / "state.json")
    missing = sorted(STATE_KEYS - set(state))
    if missing or not isinstance(state["step"], int) or state["step"] < 0 or not isinstance(state["processes"], int) \
            or state["distributed_type"] not in {member.value for member in DistributedType}:
        raise CorruptFileError(f"{folder / 'state.json'}: not a checkpoint state (missing {missing or 'a valid step'})")
    return state


def check_checkpoint_files(folder: Path) -> None:
    """Every file of the checkpoint in `folder` reads back whole and finite; checked before any model is loaded
    (shapes are compared with the model's when it is restored, `load_checkpoint`).

    accelerate's files checked here are its optimizer file and every process's random-number generators
    (`load_state` would go on without the latter, saying so only in its log); FSDP's and DeepSpeed's sharded
    files are read by `load_state` itself.
    """
    if not (folder / ACCELERATE_STATE).is_dir():
        raise CorruptFileError(f"{folder}: holds no {ACCELERATE_STATE}/ state (a checkpoint of an earlier bayeslora "
                               f"that kept optimizer.pt itself); it cannot be resumed: pass --overwrite to start again")
    state = _read_state(folder)
    read_tensors(folder / "adapter.safetensors")
    if (folder / "best_adapter.safetensors").is_file():
        read_tensors(folder / "best_adapter.safetensors")
    read_torch_state(folder / "scheduler.pt")
    accelerate_files = [f"{RNG_STATE_NAME}_{index}.pkl" for index in range(state["processes"])]
    if state["distributed_type"] not in (DistributedType.FSDP.value, DistributedType.DEEPSPEED.value):
        accelerate_files.append(f"{OPTIMIZER_NAME}.bin")
    for name in accelerate_files:
        read_torch_state(folder / ACCELERATE_STATE / name)


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Per-parameter optimizer tensors (AdamW's moments) have their parameter's shape."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for name, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    raise CorruptFileError(f"{path}: optimizer {name} has shape {list(value.shape)}, "
                                           f"its parameter {list(parameter.shape)}")
