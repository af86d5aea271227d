"""Named grids of `bayeslora compare --preset`: tasks, methods, seeds, OoD sets and training settings.

`train` holds `TrainSettings` values (the keys of `bayeslora train`), checked
like every other setting; `method_options` maps a method to its constructor's
options. Flags given on the command line override a preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALL_METHODS = ("mle", "map", "mcdropout", "ensemble", "blob", "laplace", "laplace_last", "temperature", "tfb", "bayeslora")
PAPER_TASKS = ("winogrande_s", "arc_challenge", "arc_easy", "winogrande_m", "openbookqa", "boolq")
#: the tiny model of the smoke preset (its tasks, smoke_arith and smoke_shift, are in the task registry)
FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "smoke" / "model"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": str(FIXTURE_MODEL),
        "tasks": ["smoke_arith"],
        "methods": list(ALL_METHODS),
        "seeds": [1],
        "ood_from": "smoke_arith",
        "ood_tasks": ["smoke_shift"],
        "train": {"samples": 2, "max_steps": 4, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-2, "precision": "fp32",
                  "r": 4, "lora_alpha": 8.0},
        "method_options": {"laplace": {"prior_grid": [1.0, 100.0], "tune_samples": 2},
                           "laplace_last": {"prior_grid": [1.0, 100.0], "tune_samples": 2},
                           "tfb": {"search_steps": 4, "search_samples": 2}},
    },
    # plain LoRA over-fits and is over-confident here: 200 ARC-Easy questions x 10 epochs, no model selection
    # (the last epoch is kept), scored on 500 test questions and, without retraining, on ARC-Challenge and two
    # MMLU groups; post-hoc methods fit map's adapter (docs/results/calibration-smollm2.md). Every method adapts
    # the published LoRA targets, q_proj, v_proj and lm_head (METHOD.md section 3).
    "calibration": {
        "model": "smollm2-135m",
        "tasks": ["arc_easy"],
        "methods": list(ALL_METHODS),
        "seeds": [1, 2, 3],
        "ood_from": "arc_easy",
        "ood_tasks": ["arc_challenge", "mmlu_chem", "mmlu_phys"],
        "train": {"scoring": "cloze", "limit_train": 200, "epochs": 10, "batch_size": 8, "lr": 1e-3,
                  "select_epoch": "last", "limit_validation": 100, "limit_eval": 500, "precision": "fp32",
                  "checkpoint_every": 25, "target_modules": ["q_proj", "v_proj", "lm_head"]},
    },
    "paper": {
        "tasks": list(PAPER_TASKS),
        "methods": list(ALL_METHODS),
        "seeds": [1, 2, 3],
        "ood_from": "openbookqa",
        "ood_tasks": ["arc_challenge", "arc_easy", "mmlu_chem", "mmlu_phys"],
        # the released LLaMA-2-7B settings (METHOD.md section 4); lr is per task there, 5e-4 here
        "train": {"epochs": 6, "batch_size": 6, "lr": 5e-4, "lr_schedule": "multistep", "lr_milestones": [2, 4],
                  "target_modules": ["q_proj", "v_proj", "lm_head"]},
    },
}
