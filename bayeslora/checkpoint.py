"""The run directory: who may write into it, and atomic checkpoints for `--resume`.

Layout of a run directory:
```
run.json                   the settings that define the run (refuses a different run)
train_log.jsonl            one line per optimizer step
checkpoints/latest         name of the newest complete checkpoint (replaced atomically)
checkpoints/step-000050/   adapter.safetensors, best_adapter.safetensors (trainable
                           parameters), optimizer.pt, scheduler.pt (torch.save of state
                           dicts, read back with weights_only=True), rng-<process>.pt,
                           state.json (step, epoch, selection state)
adapter_config.json, adapter_model.safetensors   the final adapter (peft format)
results.json, predictions.jsonl, reliability.png the evaluation (zero_shot/ for the base model)
```
A checkpoint is written into a temporary folder, renamed into place, and only
then named in `latest`; older checkpoints are deleted afterwards. A crash at any
moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from bayeslora.errors import UsageError
from bayeslora.files import write_atomically

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


def check_output_dir(output: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Refuse (UsageError) to write where it would clobber something; writes nothing."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")
    existing = output.is_dir() and any(output.iterdir())
    if not existing:
        if resume:
            raise UsageError(f"nothing to resume: {output} holds no run")
        _check_writable(output)
        return
    run_file = output / RUN_FILE
    if not run_file.is_file():
        raise UsageError(f"output {output} holds files that are not a bayeslora run; choose an empty or new directory")
    previous = json.loads(run_file.read_text())
    if resume:
        differences = [key for key in sorted(set(previous) | set(identity)) if previous.get(key) != identity.get(key)]
        if differences:
            key = differences[0]
            raise UsageError(f"cannot resume {output}: {key} was {previous.get(key)!r}, now {identity.get(key)!r}")
        if not has_checkpoint(output):
            raise UsageError(f"nothing to resume: {output} has no checkpoint")
    elif not overwrite:
        kind = "the same" if previous == identity else "a different"
        raise UsageError(f"output {output} holds {kind} run; pass --resume to continue it or --overwrite to replace it")
    _check_writable(output)


def _check_writable(output: Path) -> None:
    """Create and delete a file where the run would write (permission bits alone mislead root and read-only mounts)."""
    existing = output
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise UsageError(f"output {output} is not writable") from None


def start_run_dir(output: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Create (or, with overwrite, empty) the run directory and record the run; call after `check_output_dir`."""
    if overwrite and (output / RUN_FILE).is_file():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
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
    pointer = output / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    return output / CHECKPOINTS / pointer.read_text().strip()


def save_checkpoint(
    output: Path,
    accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    best_adapter: dict[str, torch.Tensor] | None,
) -> None:
    """Write a checkpoint for optimizer step `state["step"]` atomically (all processes call this)."""
    folder = output / CHECKPOINTS
    name = f"step-{state['step']:06d}"
    temporary = folder / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    write_atomically(temporary / f"rng-{accelerator.process_index}.pt", _torch_bytes(rng))
    if accelerator.is_main_process:
        write_atomically(temporary / "adapter.safetensors", safetensors_bytes(trainable_state(model)))
        if best_adapter is not None:
            write_atomically(temporary / "best_adapter.safetensors", safetensors_bytes(best_adapter))
        write_atomically(temporary / "optimizer.pt", _torch_bytes(optimizer.state_dict()))
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
    """Restore the newest checkpoint into model/optimizer/scheduler/RNG; returns (state, best adapter)."""
    folder = latest_checkpoint(output)
    load_trainable_state(model, load_file(folder / "adapter.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / f"rng-{accelerator.process_index}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    best_file = folder / "best_adapter.safetensors"
    best = load_file(best_file) if best_file.is_file() else None
    return json.loads((folder / "state.json").read_text()), best
