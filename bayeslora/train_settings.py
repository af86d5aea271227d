"""Settings of one training run: defaults, YAML file, command-line flags, validation.

Every setting is declared once, here: its default, its flag (help, type,
choices) and its checks. `bayeslora train` and each unit of `bayeslora compare`
build their settings through the same functions. Precedence: dataclass default
< YAML file (`--config`; compare: preset < `--train-config`) < command-line
flag. The YAML file takes the same keys as the flags (`batch_size` or
`batch-size`) and its values are converted like the flags' (YAML reads `5e-4`
as a string). Every setting is checked before anything is loaded or written; a
bad value raises a `UsageError` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bayeslora.errors import UsageError
from bayeslora.models import DEFAULT_MODEL, DTYPES, check_loading
from bayeslora.schedules import KL_WEIGHTINGS, LR_SCHEDULES
from bayeslora.tracking import REPORT_TO, check_report_to


def _setting(default: Any, help: str, **argparse_options: Any) -> Any:
    """A dataclass field that also describes its command-line flag."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **argparse_options})
    return field(default=default, metadata={"help": help, **argparse_options})


#: settings that say where a run is, reports or checkpoints, not what it computes: a resumed run may differ in them
NOT_IDENTITY = ("report_to", "output", "checkpoint_every", "checkpoint_minutes")

#: questions held out of a --task-file for model selection unless validation_size says otherwise
FILE_VALIDATION_SIZE = 200
#: how the base model is loaded: also flags of `evaluate` and `compare`
LOADING_SETTINGS = ("dtype", "load_in_4bit", "load_in_8bit")


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
    limit_validation: int | None = _setting(None, "use the first K validation questions (model selection, post-hoc fits)", type=int)
    validation_size: int | None = _setting(None, "--task-file: questions held out of the file for model selection "
                                                 f"(default {FILE_VALIDATION_SIZE}; a registry task selects on its "
                                                 "validation role)", type=int)
    validation_seed: int = _setting(0, "--task-file: seed of the validation hold-out (independent of --seed)", type=int)
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
    select_epoch: str = _setting("best", "keep the epoch with the best validation NLL, or the last one (then "
                                         "validation runs once, at the end)", choices=["best", "last"])
    early_stopping: int | None = _setting(None, "stop after this many epochs without a better validation NLL", type=int)
    adapter_from: str | None = _setting(None, "a finished run whose trained adapter this run fits post hoc, "
                                              "without training (a post-hoc method reusing its base method's run)")
    samples: int | None = _setting(None, "predictive samples at evaluation (default: the method's)", type=int)
    eval_batch_size: int = _setting(16, "questions per evaluation forward", type=int)
    zero_shot: bool = _setting(True, "also evaluate the base model before training", action=argparse.BooleanOptionalAction)
    seed: int = _setting(0, "seed of the adapter initialisation, data order and posterior draws", type=int)
    checkpoint_every: int = _setting(50, "checkpoint every K optimizer steps (and at each epoch end)", type=int)
    checkpoint_minutes: float = _setting(2.0, "also checkpoint when this many minutes passed since the last "
                                         "checkpoint (0 = off)", type=float)
    truncate_left: bool = _setting(False, "shorten questions longer than the model's context from the left "
                                   "(default: refuse them)", action="store_true")
    report_to: str = _setting("none", "also log train_log.jsonl's records to this tracker (accelerate's)",
                              choices=list(REPORT_TO))

    @property
    def quantization(self) -> str | None:
        """"4bit", "8bit" or None, as `models.load_model` takes it."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    def lora(self) -> dict[str, Any]:
        """The adapter's LoRA settings, as `Method.prepare` takes them (and a run folder records them)."""
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules)}

    def loading(self) -> dict[str, Any]:
        """The keyword arguments of `models.load_model` (and what a run folder records of them)."""
        return {"dtype": self.dtype, "quantization": self.quantization}

    def run_identity(self) -> dict[str, Any]:
        """What defines the run: a directory holding a different one is not reused silently.

        Files and folders are named by their resolved paths (`runs/x`, `runs/x/` and `/abs/runs/x` are one
        run). Left out: `NOT_IDENTITY` (where the run is, reports and how often it checkpoints).
        """
        identity = dataclasses.asdict(self)
        for name in NOT_IDENTITY:
            del identity[name]
        for name in ("task_file", "eval_file"):
            if identity[name] is not None:
                identity[name] = os.path.realpath(identity[name])
        if self.model != DEFAULT_MODEL and Path(self.model).expanduser().is_dir():
            identity["model"] = os.path.realpath(Path(self.model).expanduser())
        return identity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`bayeslora train`: --config, one flag per setting, and how to treat the output directory."""
    parser.add_argument("--config", help="YAML file of settings (flags override it)")
    add_setting_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output")


def add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                      defaults: dict[str, Any] | None = None) -> None:
    """One flag per setting (`names`: these only; `defaults`: shown instead of the dataclass's); flags left
    out keep the YAML or default value."""
    for setting in dataclasses.fields(TrainSettings):
        if setting.name == "method_options" or (names is not None and setting.name not in names):
            continue
        options = dict(setting.metadata)
        default = setting.default_factory() if setting.default_factory is not dataclasses.MISSING else setting.default
        default = (defaults or {}).get(setting.name, default)
        if default not in (None, [], {}):
            options["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        parser.add_argument("--" + setting.name.replace("_", "-"), default=argparse.SUPPRESS, **options)


def given_settings(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The settings given as flags (`names`: these only); a flag left out is absent from `args`."""
    names = names if names is not None else tuple(setting.name for setting in dataclasses.fields(TrainSettings))
    return {name: value for name, value in vars(args).items() if name in names}


def check_loading_settings(dtype: str, load_in_4bit: bool, load_in_8bit: bool) -> None:
    for name, value in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be true or false, got {value!r}")
    if load_in_4bit and load_in_8bit:
        raise UsageError("--load-in-4bit and --load-in-8bit exclude each other")
    check_loading(dtype, "4bit" if load_in_4bit else "8bit" if load_in_8bit else None)


def loading_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `load_model` keyword arguments the LOADING_SETTINGS flags gave (`evaluate`); absent ones left out."""
    given = given_settings(args, LOADING_SETTINGS)
    four, eight = given.get("load_in_4bit", False), given.get("load_in_8bit", False)
    check_loading_settings(given.get("dtype", "fp32"), four, eight)
    loading = {"dtype": given["dtype"]} if "dtype" in given else {}
    if four or eight:
        loading["quantization"] = "4bit" if four else "8bit"
    return loading


def make_settings(values: dict[str, Any]) -> TrainSettings:
    """Settings from (converted) values, validated."""
    settings = TrainSettings(**values)
    validate(settings)
    return settings


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Defaults, then the YAML file, then the flags given; validated."""
    values = read_config(args.config) if getattr(args, "config", None) else {}
    return make_settings({**values, **given_settings(args)})


def read_yaml_mapping(path: str | Path, flag: str) -> dict[Any, Any]:
    """A YAML file holding a mapping (empty file: {}); `flag` names the file in messages."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"cannot read {flag} {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{flag} {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(loaded, (dict, type(None))):
        raise UsageError(f"{flag} {path} must be a mapping")
    return loaded or {}


def read_config(path: str | Path, flag: str = "config") -> dict[str, Any]:
    """The settings of a YAML file, each converted like its flag; `flag` names the file in messages."""
    loaded = read_yaml_mapping(path, flag)
    fields = {setting.name: setting for setting in dataclasses.fields(TrainSettings)}
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise UsageError(f"{flag} {path}: unknown setting {key!r}")
        values[name] = _coerce(name, value, fields[name], flag)
    return values


def _coerce(name: str, value: Any, setting: dataclasses.Field, flag: str) -> Any:
    """Check a YAML value against the flag's type (YAML reads 5e-4 as a string)."""
    choices = setting.metadata.get("choices")
    if choices is not None and value not in choices:
        raise UsageError(f"{flag}: {name} must be one of {', '.join(choices)}, got {value!r}")
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
        raise UsageError(f"{flag}: {name} must be {convert.__name__}, got {value!r}") from None


def validate(settings: TrainSettings) -> None:
    """Reject impossible settings with a one-line message naming the value."""
    s = settings
    if not s.model:
        raise UsageError("--model is required")
    if not s.output:
        raise UsageError("--output is required")
    if (s.task is None) == (s.task_file is None):
        raise UsageError("give exactly one of --task and --task-file")
    check_loading_settings(s.dtype, s.load_in_4bit, s.load_in_8bit)
    if s.eval_file is not None and s.task_file is None:
        raise UsageError("--eval-file goes with --task-file (a registry task has its own evaluation split)")
    for path in (s.task_file, s.eval_file):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
    from bayeslora.methods import METHODS, check_method_name  # the registry fills as method modules are imported

    check_method_name(s.method)
    check_report_to(s.report_to)
    for setting in dataclasses.fields(TrainSettings):
        value = getattr(s, setting.name)
        if setting.metadata.get("type") is float and value is not None and not math.isfinite(value):
            raise UsageError(f"{setting.name} must be a finite number, got {value}")
    positive = {"lr": s.lr, "epochs": s.epochs, "batch_size": s.batch_size, "grad_accum": s.grad_accum,
                "r": s.r, "eval_batch_size": s.eval_batch_size, "checkpoint_every": s.checkpoint_every}
    optional_positive = {"max_steps": s.max_steps, "limit_train": s.limit_train, "limit_eval": s.limit_eval,
                         "limit_validation": s.limit_validation, "samples": s.samples, "early_stopping": s.early_stopping}
    for name, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
        if not value > 0:
            raise UsageError(f"{name} must be > 0, got {value}")
    non_negative = {"beta": s.beta, "kl_warmup": s.kl_warmup, "warmup_steps": s.warmup_steps,
                    "max_grad_norm": s.max_grad_norm, "validation_size": s.validation_size or 0,
                    "entropy_bonus": s.entropy_bonus, "lora_alpha": s.lora_alpha,
                    "checkpoint_minutes": s.checkpoint_minutes}
    if s.validation_size is not None and s.task is not None:
        raise UsageError("validation_size holds questions out of a --task-file; a registry task selects on its "
                         "validation role (cap it with limit_validation)")
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
    if s.early_stopping is not None and s.select_epoch == "last":
        raise UsageError("early_stopping selects the best epoch; it cannot go with select_epoch last")
    if s.adapter_from is not None and METHODS[s.method].post_hoc_of is None:
        raise UsageError(f"adapter_from is for post-hoc methods ({', '.join(n for n, m in METHODS.items() if m.post_hoc_of)}); "
                         f"{s.method} trains its own adapter")
