"""Settings of one training run: defaults, YAML file, command-line flags, validation.

Precedence: dataclass default < `--config file.yaml` < command-line flag. The YAML
file takes the same keys as the flags (`batch_size` or `batch-size`). Every
setting is checked before anything is loaded or written; a bad value raises a
`UsageError` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bayeslora.errors import UsageError
from bayeslora.models import DEFAULT_MODEL, DTYPES, check_loading
from bayeslora.schedules import KL_WEIGHTINGS, LR_SCHEDULES


def _setting(default: Any, help: str, **argparse_options: Any) -> Any:
    """A dataclass field that also describes its command-line flag."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **argparse_options})
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainSettings:
    # what to train
    model: str = _setting(None, f"Hub id, local folder, or {DEFAULT_MODEL!r} (offline default)")
    task: str | None = _setting(None, "registry task name (e.g. arc_easy)")
    task_file: str | None = _setting(None, "JSONL file of training questions (instead of --task)")
    eval_file: str | None = _setting(None, "JSONL file of evaluation questions (with --task-file)")
    source: str = _setting("offline", "where registry tasks come from", choices=["offline", "hub"])
    method: str = _setting("bayeslora", "uncertainty method (see bayeslora.methods)")
    method_options: dict = _setting({}, "method options (YAML only), passed to the method's constructor")
    scoring: str = _setting("letter", "how choices are scored", choices=["letter", "cloze"])
    normalization: str = _setting("mean", "cloze: mean or sum of the answer's token log-probabilities", choices=["mean", "sum"])
    output: str = _setting(None, "run directory: adapter, checkpoints, logs, results")
    # base model weights (adapters stay fp32)
    dtype: str = _setting("fp32", "dtype of the base model's weights", choices=list(DTYPES))
    load_in_4bit: bool = _setting(False, "load the base model 4-bit (bitsandbytes NF4; --dtype is the compute dtype)",
                                  action="store_true")
    load_in_8bit: bool = _setting(False, "load the base model 8-bit (bitsandbytes)", action="store_true")
    # adapter
    r: int = _setting(8, "LoRA rank", type=int)
    lora_alpha: float = _setting(16.0, "LoRA alpha (scaling alpha / r)", type=float)
    lora_dropout: float = _setting(0.0, "LoRA dropout", type=float)
    target_modules: list = _setting(["q_proj", "v_proj"], "modules that get an adapter", nargs="+")
    # data
    limit_train: int | None = _setting(None, "use at most this many training questions", type=int)
    limit_eval: int | None = _setting(None, "evaluate on the first K evaluation questions only (not the protocol)", type=int)
    validation_size: int = _setting(200, "questions held out from the training split for model selection", type=int)
    validation_seed: int = _setting(0, "seed of the validation hold-out (independent of --seed)", type=int)
    # optimisation
    epochs: int = _setting(1, "passes over the training questions", type=int)
    max_steps: int | None = _setting(None, "stop after this many optimizer steps", type=int)
    batch_size: int = _setting(8, "questions per optimizer step, over all processes and accumulation steps", type=int)
    grad_accum: int = _setting(1, "micro-batches per optimizer step and process", type=int)
    lr: float = _setting(5e-4, "AdamW learning rate", type=float)
    lr_schedule: str = _setting("constant", "learning-rate schedule", choices=list(LR_SCHEDULES))
    warmup_steps: int = _setting(0, "linear learning-rate warm-up steps", type=int)
    lr_milestones: list = _setting([2, 4], "multistep: LR x0.1 after these epochs", nargs="+", type=int)
    max_grad_norm: float = _setting(1.0, "gradient clipping norm (0 = off)", type=float)
    precision: str = _setting("auto", "bf16 autocast or fp32 (auto: bf16 where the hardware has it)", choices=["auto", "bf16", "fp32"])
    # regulariser (the method's KL for Bayesian methods)
    kl_weighting: str = _setting("beta", "beta * KL / N_train, or the released code's variant", choices=list(KL_WEIGHTINGS))
    beta: float = _setting(1.0, "KL weight (kl_weighting beta)", type=float)
    kl_warmup: int = _setting(0, "linear KL warm-up length (0 = none)", type=int)
    kl_warmup_unit: str = _setting("steps", "unit of --kl-warmup", choices=["steps", "epochs"])
    label_smoothing: float = _setting(0.0, "label smoothing over the choices (released code: 0.05)", type=float)
    entropy_bonus: float = _setting(0.0, "subtract this times the predictive entropy (released code: 0.05)", type=float)
    # selection and evaluation
    early_stopping: int | None = _setting(None, "stop after this many epochs without a better validation NLL", type=int)
    samples: int | None = _setting(None, "predictive samples at evaluation (default: the method's)", type=int)
    eval_batch_size: int = _setting(16, "questions per evaluation forward", type=int)
    zero_shot: bool = _setting(True, "also evaluate the base model before training", action=argparse.BooleanOptionalAction)
    seed: int = _setting(0, "seed of the adapter initialisation, data order and posterior draws", type=int)
    checkpoint_every: int = _setting(50, "checkpoint every K optimizer steps (and at each epoch end)", type=int)

    @property
    def quantization(self) -> str | None:
        """"4bit", "8bit" or None, as `models.load_model` takes it."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def run_identity(self) -> dict[str, Any]:
        """What defines the run: a directory holding a different one is not reused silently."""
        return dataclasses.asdict(self)


RUN_FLAGS = ("resume", "overwrite")  # how to treat the output directory; not part of the run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; flags left out keep the YAML or default value."""
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    for setting in dataclasses.fields(TrainSettings):
        if setting.name == "method_options":
            continue
        options = dict(setting.metadata)
        default = setting.default_factory() if setting.default_factory is not dataclasses.MISSING else setting.default
        if default not in (None, [], {}):
            options["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        parser.add_argument("--" + setting.name.replace("_", "-"), default=argparse.SUPPRESS, **options)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Defaults, then the YAML file, then the flags given; validated."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_read_yaml(Path(args.config)))
    names = {setting.name for setting in dataclasses.fields(TrainSettings)}
    values.update({name: value for name, value in vars(args).items() if name in names})
    settings = TrainSettings(**values)
    validate(settings)
    return settings


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"cannot read config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config {path} must be a mapping of setting: value")
    fields = {setting.name: setting for setting in dataclasses.fields(TrainSettings)}
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UsageError(f"config {path}: unknown setting {key!r}")
        values[name] = _coerce(name, value, fields[name])
    return values


def _coerce(name: str, value: Any, setting: dataclasses.Field) -> Any:
    """Check a YAML value against the flag's type (YAML reads 5e-4 as a string)."""
    choices = setting.metadata.get("choices")
    if choices is not None and value not in choices:
        raise UsageError(f"config: {name} must be one of {', '.join(choices)}, got {value!r}")
    convert = setting.metadata.get("type", lambda item: item)
    if value is None:
        return value
    try:
        if setting.metadata.get("nargs") == "+":
            return [convert(item) for item in (value if isinstance(value, list) else [value])]
        if convert is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return convert(value)
    except (TypeError, ValueError):
        raise UsageError(f"config: {name} must be {convert.__name__}, got {value!r}") from None


def validate(settings: TrainSettings) -> None:
    """Reject impossible settings with a one-line message naming the value."""
    s = settings
    if not s.model:
        raise UsageError("--model is required")
    if not s.output:
        raise UsageError("--output is required")
    if (s.task is None) == (s.task_file is None):
        raise UsageError("give exactly one of --task and --task-file")
    for name in ("load_in_4bit", "load_in_8bit"):
        if not isinstance(getattr(s, name), bool):
            raise UsageError(f"{name} must be true or false, got {getattr(s, name)!r}")
    if s.load_in_4bit and s.load_in_8bit:
        raise UsageError("--load-in-4bit and --load-in-8bit exclude each other")
    check_loading(s.dtype, s.quantization)
    if s.eval_file is not None and s.task_file is None:
        raise UsageError("--eval-file goes with --task-file (a registry task has its own evaluation split)")
    for path in (s.task_file, s.eval_file):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
    from bayeslora.methods import METHODS  # the registry fills as method modules are imported

    if s.method not in METHODS:
        raise UsageError(f"unknown method {s.method!r}; valid methods: {', '.join(sorted(METHODS))}")
    positive = {"lr": s.lr, "epochs": s.epochs, "batch_size": s.batch_size, "grad_accum": s.grad_accum,
                "r": s.r, "eval_batch_size": s.eval_batch_size, "checkpoint_every": s.checkpoint_every}
    optional_positive = {"max_steps": s.max_steps, "limit_train": s.limit_train, "limit_eval": s.limit_eval,
                         "samples": s.samples, "early_stopping": s.early_stopping}
    for name, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if not value > 0:
            raise UsageError(f"{name} must be > 0, got {value}")
    non_negative = {"beta": s.beta, "kl_warmup": s.kl_warmup, "warmup_steps": s.warmup_steps,
                    "max_grad_norm": s.max_grad_norm, "validation_size": s.validation_size,
                    "entropy_bonus": s.entropy_bonus, "lora_alpha": s.lora_alpha}
    for name, value in non_negative.items():
        if not value >= 0:
            raise UsageError(f"{name} must be >= 0, got {value}")
    for name, value in {"label_smoothing": s.label_smoothing, "lora_dropout": s.lora_dropout}.items():
        if not 0 <= value < 1:
            raise UsageError(f"{name} must be in [0, 1), got {value}")
    if any(epoch <= 0 for epoch in s.lr_milestones):
        raise UsageError(f"lr_milestones must be positive epochs, got {s.lr_milestones}")
    if s.early_stopping is not None and s.validation_size == 0:
        raise UsageError("early_stopping needs a validation set (validation_size > 0)")
