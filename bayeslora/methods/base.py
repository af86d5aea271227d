"""The interface every uncertainty method implements, and the method registry.

All methods share one path: the same data, the same scoring (per-choice
logits), the same training loop, the same predictive averaging and the same
metrics. A method contributes only what differs:

- `prepare`: how its adapter is built on the base model (a peft model);
- `parameter_groups`: how the optimizer treats its trainable parameters (weight decay);
- `regulariser`: what it adds to the mean task NLL of a training step
  (e.g. Bayesian-LoRA's beta * KL / N_train);
- `members`: independently trained copies (an ensemble's members); the
  training loop trains once inside each member's context, seed + index;
- `after_training`: post-hoc fitting on the held-out validation set
  (Laplace's prior precision, temperature scaling, TFB's variance search),
  with the training batches at hand for curvature (Laplace's KFAC);
- `draws`: one context manager per predictive sample; inside it the model
  computes one member of the predictive mixture (a posterior draw, a dropout
  mask, an ensemble member). The method owns the number of draws: `n_samples`
  None means its `default_samples`; deterministic methods give one draw and an
  ensemble one per member, whatever is asked;
- `adjust_logits`: a transform of per-choice logits before the softmax
  (temperature scaling);
- `fitted_state` / `load_fitted_state`: what `after_training` fitted beyond the
  adapter weights peft saves (a temperature, Laplace factors), as tensors and
  JSON values, so that a run folder restores the method (`bayeslora.runs`).

Register a method with `@register_method`; look it up with `get_method(name)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, ContextManager

import torch
from torch import nn

from bayeslora.errors import UsageError

METHODS: dict[str, type["Method"]] = {}
#: predictive samples of every sampling method unless asked otherwise (the paper's N)
PREDICTIVE_SAMPLES = 4


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make `cls` available under `cls.name`."""
    METHODS[cls.name] = cls
    return cls


def check_method_name(name: str, where: str = "") -> None:
    """A `UsageError` listing the valid names unless `name` is a registered method (`where`: e.g. " in --methods")."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}{where}; valid methods: {', '.join(sorted(METHODS))}")


def get_method(name: str, **options: Any) -> "Method":
    """An instance of the method called `name`; a `UsageError` lists the valid names."""
    check_method_name(name)
    return METHODS[name](**options)


class Method:
    """Base class: plain deterministic LoRA behaviour; subclasses override what differs."""

    name: ClassVar[str]
    #: posterior / predictive samples at test time (1 for deterministic methods)
    default_samples: ClassVar[int] = 1
    #: a post-hoc method names the method whose trained adapter it fits (`compare` reuses that run)
    post_hoc_of: ClassVar[str | None] = None
    #: AdamW weight decay used by the training loop
    weight_decay: ClassVar[float] = 0.0
    #: the method's adapter or fitted state is more than a plain peft LoRA adapter folder holds, so it is
    #: restored from a run folder only (`bayeslora.runs`), never rebuilt around a bare adapter
    needs_run_folder: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    def prepare(self, model: nn.Module, lora: dict[str, Any]) -> nn.Module:
        """Wrap the base causal LM with this method's adapter; `lora` holds r, lora_alpha, lora_dropout, target_modules."""
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW parameter groups of the trainable parameters: one group with the method's weight decay by default."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": self.weight_decay}]

    def regulariser(
        self, model: nn.Module, n_train: int, step_in_epoch: int = 0, batches_per_epoch: int = 1
    ) -> torch.Tensor | None:
        """A term added to the mean training NLL of one step, or None.

        `n_train` is the loop's KL divisor; `step_in_epoch` (0-based) and `batches_per_epoch` say where the
        step stands in its epoch, for methods whose weighting follows the minibatch index (BLoB).
        """
        return None

    def members(self, model: nn.Module) -> Iterator[ContextManager]:
        """One context per independently trained member: the training loop runs a full training inside
        each, in turn, with seed + member index (data order and nothing else re-seeded). One empty
        context by default (a single adapter)."""
        yield contextlib.nullcontext()

    def after_training(
        self,
        model: nn.Module,
        validation_batches: list[Any],
        choice_logits: Callable[[nn.Module, Any], torch.Tensor],
        train_batches: list[Any] | None = None,
    ) -> None:
        """Post-hoc fitting on held-out validation data (and, for curvature, the training batches); nothing by default."""

    def draws(self, model: nn.Module, n_samples: int | None = None, seed: int = 0) -> Iterator[ContextManager]:
        """One context per predictive sample (`n_samples`, None: `default_samples`); deterministic methods
        give one empty context."""
        yield contextlib.nullcontext()

    def sample_count(self, n_samples: int | None) -> int:
        """The number of draws of a sampling method: `n_samples`, or its default when None."""
        return self.default_samples if n_samples is None else n_samples

    def adjust_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-choice logits (questions x choices) -> logits fed to the softmax."""
        return logits

    def fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What `after_training` fitted beyond the adapter weights: (named tensors, JSON-serialisable values)."""
        return {}, {}

    def load_fitted_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Put back what `fitted_state` returned, on a model rebuilt by `prepare` and loaded with the saved adapter.

        A missing or malformed entry raises KeyError, TypeError or ValueError (the caller names the run folder).
        """
