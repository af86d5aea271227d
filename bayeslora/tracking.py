"""Experiment tracking through accelerate's trackers: `--report-to tensorboard|wandb|trackio|mlflow|none`.

A run (`bayeslora train`, or one unit of `bayeslora compare`) logs to the tracker
exactly the records of its train_log.jsonl (one per optimizer step, at that step),
nested values flattened into `/`-joined names (`validation/validation_nll`,
`relative_update/<module>`); an ensemble's members log under `member-<k>/`.
The run's settings are stored as the tracker's configuration. Project
"bayeslora"; the run is named after its output directory (compare: task /
method / seed). TensorBoard writes into `<output>/tracking/`; wandb, trackio and
mlflow use their own configuration (environment variables, logins). Each tracker
needs its package (`pip install tensorboard`, `wandb`, `trackio` or `mlflow`);
a missing one is a usage error before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import (
    ProjectConfiguration,
    is_mlflow_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)

from bayeslora.errors import UsageError

PROJECT = "bayeslora"
TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "trackio": is_trackio_available,
            "mlflow": is_mlflow_available}
REPORT_TO = ("none", *TRACKERS)


def check_report_to(report_to: str) -> None:
    if report_to not in REPORT_TO:
        raise UsageError(f"unknown --report-to {report_to!r}; valid: {', '.join(REPORT_TO)}")
    if report_to != "none" and not TRACKERS[report_to]():
        raise UsageError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) train_log.jsonl record, under `/`-joined names starting with `prefix`."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + key] = value
    return flat


def accelerator_options(report_to: str, output: Path) -> dict[str, Any]:
    """Keyword arguments of `Accelerator` that attach the tracker (none for "none")."""
    if report_to == "none":
        return {}
    return {"log_with": [report_to],
            "project_config": ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "tracking"))}


def start_tracking(accelerator: Accelerator, report_to: str, settings: dict[str, Any], run_name: str) -> None:
    """Open the run on the tracker, with the settings as its configuration (nothing for "none")."""
    if report_to == "none":
        return
    # trackers store scalars and strings; lists, mappings and None become their JSON text
    config = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
              for key, value in settings.items()}
    names = {"wandb": {"name": run_name}, "trackio": {"name": run_name}, "mlflow": {"run_name": run_name}}
    accelerator.init_trackers(PROJECT, config=config, init_kwargs={report_to: names[report_to]} if report_to in names else {})
