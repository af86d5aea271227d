"""Reading back what bayeslora saved, verified: JSON records, safetensors tensors, torch state dicts.

A file that is missing raises `MissingFileError`; one that is damaged (cut short,
not the format its name says, NaN weights) or does not hold what the code
expects (a tensor missing, left over, or of another shape) raises
`CorruptFileError`. Every message is one line that starts with the file's path.
Nothing is ever half-loaded: a model only receives tensors that passed all checks.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load
from safetensors import SafetensorError
from safetensors.torch import load_file

from bayeslora.errors import CorruptFileError, MissingFileError


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`."""
    path = Path(path)
    _require_file(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{path}: not valid JSON ({error.msg}, line {error.lineno} column {error.colno})") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object (a mapping) in `path`."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found a JSON {type(value).__name__}")
    return value


def _first(names: set[str]) -> str:
    ordered = sorted(names)
    return repr(ordered[0]) + (f" and {len(ordered) - 1} more" if len(ordered) > 1 else "")


def check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor] | None) -> None:
    """`tensors` (read from `path`) hold exactly the names of `expected`, with its shapes, floating point and finite
    (without `expected`: floating point and finite).

    Only the shape of each expected tensor is compared, not its dtype: a float16 adapter loads into float32
    parameters as peft itself would load it.
    """
    if expected is not None:
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing:
            raise CorruptFileError(f"{path}: missing tensor {_first(missing)} (saved for another model or configuration?)")
        if unexpected:
            raise CorruptFileError(f"{path}: unexpected tensor {_first(unexpected)} (saved for another model or configuration?)")
    for name, tensor in sorted(tensors.items()):
        if expected is not None and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CorruptFileError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise CorruptFileError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise CorruptFileError(f"{path}: tensor {name!r} holds NaN or infinite values")


def read_tensors(path: str | Path, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`, checked against `expected` (`check_tensors`), on the CPU."""
    path = Path(path)
    _require_file(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(f"{path}: not a readable safetensors file ({reason})") from None
    check_tensors(path, tensors, expected)
    return tensors


def read_torch_state(path: str | Path) -> Any:
    """A `torch.save`d state (optimizer, scheduler, RNG) read with weights_only=True: tensors and plain values, no code.

    Read through accelerate's `load`, which also admits numpy arrays (its random-number-generator states hold
    numpy's), still without running code from the file.
    """
    path = Path(path)
    _require_file(path)
    try:
        state = load(path, map_location="cpu")
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(f"{path}: not a readable torch state ({reason})") from None
    for tensor in _tensors_in(state):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CorruptFileError(f"{path}: holds NaN or infinite values")
    return state


def _tensors_in(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
