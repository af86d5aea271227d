"""A run folder restores its method: everything `train` fitted, saved beside the adapter and loaded back.

    run = bayeslora.load_run("runs/default")              # base model, adapter and method, as trained
    predictions = run.predict(questions)                  # the method's predictive: averaged probabilities
    predictions.probs                                     # [questions, choices]

Beside peft's adapter files (`adapter_config.json`, `adapter_model.safetensors`;
an ensemble's members in `member_<k>/`), `train` writes
    method.json                what rebuilds the method: its name and options, the LoRA settings, the base
                               model and how it was loaded, the evaluation settings, the fitted values
                               (a temperature, Laplace's prior precision, TFB's sigma)
    method_state.safetensors   the fitted tensors (Laplace's Kronecker eigenbases), possibly none
Restoring: load the base model, `method.prepare` the same adapter structure, load peft's saved
weights into it (every adapter, checked key by key), then `method.load_fitted_state`. Nothing is
pickled; a missing, truncated or foreign file is a `UsageError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from bayeslora.errors import UsageError
from bayeslora.files import write_atomically
from bayeslora.methods import Method, get_method
from bayeslora.models import load_model
from bayeslora.predictive import Predictions, predict
from bayeslora.scoring import Scorer
from bayeslora.tasks import Question

RECORD = "method.json"
STATE = "method_state.safetensors"
FORMAT = "bayeslora-run-method-v1"


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `train` (it holds method.json)."""
    return (Path(path) / RECORD).is_file()


def save_method_state(
    directory: str | os.PathLike,
    method: Method,
    *,
    options: dict[str, Any],
    lora: dict[str, Any],
    model: str,
    loading: dict[str, Any],
    evaluation: dict[str, Any],
) -> None:
    """Write method_state.safetensors, then method.json (each renamed into place), beside a saved adapter.

    `options` are the method's constructor options, `lora` the adapter description given to `prepare`,
    `model` the base model as named by the user, `loading` the keyword arguments of `load_model`
    (dtype, quantization), `evaluation` the scoring settings of the run's own results.json.
    """
    directory = Path(directory)
    tensors, values = method.fitted_state()
    write_atomically(directory / STATE, save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}))
    record = {"format": FORMAT, "method": method.name, "options": options, "lora": lora, "model": model,
              "loading": loading, "evaluation": evaluation, "fitted": values}
    write_atomically(directory / RECORD, json.dumps(record, indent=1) + "\n")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """method.json of a run folder, checked for the fields restoring needs."""
    path = Path(directory) / RECORD
    if not path.is_file():
        raise UsageError(f"{str(directory)!r} is not a bayeslora run folder (no {RECORD})")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path} is not readable JSON (truncated?)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UsageError(f"{path} is not a {FORMAT} record")
    for key in ("method", "options", "lora", "model", "loading", "evaluation", "fitted"):
        if key not in record:
            raise UsageError(f"{path} lacks {key!r}")
    return record


def _read_tensors(directory: Path, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of the run folder `directory`; a missing or unreadable one is named."""
    if not path.is_file():
        raise UsageError(f"run folder {str(directory)!r} lacks {path.relative_to(directory)}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{path} cannot be read ({str(error).splitlines()[0]})") from None


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The saved weights of every adapter of a run folder, by adapter name ("default": the folder itself).

    peft saves an adapter other than "default" in the subfolder of its name; every folder with an
    adapter_config.json must hold a readable adapter_model.safetensors.
    """
    directory = Path(directory)
    folders = {"default": directory} if (directory / "adapter_config.json").is_file() else {}
    folders.update({folder.name: folder for folder in sorted(directory.iterdir()) if (folder / "adapter_config.json").is_file()})
    return {adapter: _read_tensors(directory, folder / "adapter_model.safetensors") for adapter, folder in folders.items()}


def load_adapter_weights(
    model: PeftModel, weights: dict[str, dict[str, torch.Tensor]], directory: Path, method_name: str
) -> None:
    """Load `weights` (from `read_adapter_weights`) into every adapter of `model`, checked key by key.

    An adapter from another method or another peft type is refused with a `UsageError` naming its file.
    """
    for adapter in model.peft_config:
        weights_file = (directory if adapter == "default" else directory / adapter) / "adapter_model.safetensors"
        if adapter not in weights:
            raise UsageError(f"run folder {str(directory)!r} lacks {weights_file.relative_to(directory)}")
        result = set_peft_model_state_dict(model, weights[adapter], adapter_name=adapter)
        # missing keys include the base model's and the other adapters': only this adapter's count
        missing = sorted(key for key in result.missing_keys if f".{adapter}." in key or key.endswith(f".{adapter}"))
        if result.unexpected_keys or missing:
            first = (sorted(result.unexpected_keys) or missing)[0]
            kind = "unexpected" if result.unexpected_keys else "missing"
            raise UsageError(f"{weights_file} is not an adapter of method {method_name} ({kind} tensor {first})")


@dataclass
class LoadedRun:
    """A run folder loaded back: the model with its adapter(s), the tokenizer, and the fitted method."""

    model: nn.Module
    tokenizer: Any
    method: Method
    record: dict[str, Any]

    def predict(
        self,
        questions: Sequence[Question],
        n_samples: int | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
        scoring: str | None = None,
        normalization: str | None = None,
    ) -> Predictions:
        """The method's predictive on `questions` (`.probs`: probabilities averaged over its draws).

        Settings left out are the run's own evaluation settings, so the numbers match its results.json.
        """
        run = self.record["evaluation"]
        scorer = Scorer(self.tokenizer, scoring or run["scoring"], normalization=normalization or run["normalization"])
        return predict(self.model, scorer, questions, self.method, run["samples"] if n_samples is None else n_samples,
                       run["seed"] if seed is None else seed, batch_size or run["batch_size"])


def load_run(directory: str | os.PathLike, model: str | None = None, **loading: Any) -> LoadedRun:
    """Restore a run folder written by `train`: base model + adapter(s) + the method with what it fitted.

    `model` replaces the recorded base model name (a local copy of the same model, say); `loading`
    (`dtype`, `quantization`) replaces how it was loaded, as in `bayeslora.models.load_model`.
    """
    directory = Path(directory)
    record = read_record(directory)
    tensors = _read_tensors(directory, directory / STATE)
    adapters = read_adapter_weights(directory)  # every file is read before the base model is loaded
    method = get_method(record["method"], **record["options"])
    base, tokenizer = load_model(model or record["model"], **{**record["loading"], **loading})
    peft_model = method.prepare(base, record["lora"])
    load_adapter_weights(peft_model, adapters, directory, record["method"])
    try:
        method.load_fitted_state(peft_model, tensors, record["fitted"])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"run folder {str(directory)!r}: the fitted state of {record['method']} does not load "
                         f"({type(error).__name__}: {error})") from None
    return LoadedRun(peft_model.eval(), tokenizer, method, record)
