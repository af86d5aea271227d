"""The task registry: which questions back each task's train / validation / test roles.

Every task has three roles, named the same for all tasks:

- `train`: what a method is fitted on;
- `validation`: held out from the training data, the only data used to select
  anything (epochs, learning rate, KL weight, temperature, Laplace prior);
- `test`: the evaluation split, reported in full.

Each role is backed by one split of the source dataset, optionally a seeded
subset of it (`Subset`). Where a benchmark has no labelled test split (BoolQ,
Winogrande) its official validation split is the evaluation split, as in the
literature, and the `validation` role is carved out of the official training
split. docs/protocol.md lists the resulting sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: seed of every subset permutation; changing it changes the Winogrande-S/M and held-out sets
SUBSET_SEED = 0
#: size of the validation set held out of the official training split where no other exists
HELD_OUT_SIZE = 1000
#: the role every reported number comes from
EVALUATION_ROLE = "test"
ROLES = ("train", "validation", "test")


@dataclass(frozen=True)
class Subset:
    """Positions [start, stop) of a permutation of the split's rows drawn with `SUBSET_SEED`.

    Subsets of the same split share the permutation, so non-overlapping ranges
    give disjoint question sets.
    """

    start: int
    stop: int


@dataclass(frozen=True)
class SplitSource:
    """One split of the source dataset (its own name: train / validation / test / dev), maybe subsetted."""

    split: str
    subset: Subset | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # which loader reads it: arc_easy, arc_challenge, openbookqa, boolq, winogrande, mmlu
    description: str
    roles: dict[str, SplitSource]
    subjects: tuple[str, ...] = field(default=())  # MMLU groups only
    packaged: bool = False  # read from the package's own files (bayeslora/fixtures/smoke), whatever the source


def _official(train: str = "train", validation: str = "validation", test: str = "test") -> dict[str, SplitSource]:
    return {"train": SplitSource(train), "validation": SplitSource(validation), "test": SplitSource(test)}


def _held_out(train_size: int | None, train_split_size: int) -> dict[str, SplitSource]:
    """Train on (a subset of) the official train split, select on a disjoint held-out part, test on validation."""
    train_stop = train_split_size - HELD_OUT_SIZE if train_size is None else train_size
    return {
        "train": SplitSource("train", Subset(0, train_stop)),
        "validation": SplitSource("train", Subset(train_split_size - HELD_OUT_SIZE, train_split_size)),
        "test": SplitSource("validation"),
    }


# MMLU's own subject -> subcategory map (Hendrycks et al., categories.py), grouped as the
# out-of-distribution sets of BLoB (chemistry, physics) and Laplace-LoRA (cs, engineering, law, health).
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "mmlu_chem": ("college_chemistry", "high_school_chemistry"),
    "mmlu_phys": ("astronomy", "college_physics", "conceptual_physics", "high_school_physics"),
    "mmlu_cs": ("college_computer_science", "computer_security", "high_school_computer_science", "machine_learning"),
    "mmlu_eng": ("electrical_engineering",),
    "mmlu_law": ("international_law", "jurisprudence", "professional_law"),
    "mmlu_health": (
        "anatomy",
        "clinical_knowledge",
        "college_medicine",
        "human_aging",
        "medical_genetics",
        "nutrition",
        "professional_medicine",
        "virology",
    ),
}

WINOGRANDE_XL_TRAIN_SIZE = 40398
BOOLQ_TRAIN_SIZE = 9427

_TASK_LIST = [
    TaskSpec("arc_easy", "arc_easy", "AI2 Reasoning Challenge, easy set (4 choices, a few 3 or 5)", _official()),
    TaskSpec("arc_challenge", "arc_challenge", "AI2 Reasoning Challenge, challenge set", _official()),
    TaskSpec("openbookqa", "openbookqa", "OpenBookQA, main configuration (4 choices)", _official()),
    TaskSpec(
        "boolq",
        "boolq",
        "BoolQ yes/no questions about a passage; evaluated on the official validation split",
        _held_out(None, BOOLQ_TRAIN_SIZE),
    ),
    TaskSpec(
        "winogrande_s",
        "winogrande",
        "Winogrande-S: a seeded 640-question subset of Winogrande-xl train; evaluated on xl validation",
        _held_out(640, WINOGRANDE_XL_TRAIN_SIZE),
    ),
    TaskSpec(
        "winogrande_m",
        "winogrande",
        "Winogrande-M: a seeded 2,558-question subset of Winogrande-xl train; evaluated on xl validation",
        _held_out(2558, WINOGRANDE_XL_TRAIN_SIZE),
    ),
] + [
    TaskSpec(
        name,
        "mmlu",
        f"MMLU {name.removeprefix('mmlu_')} subjects (out-of-distribution evaluation only): {', '.join(subjects)}",
        {"validation": SplitSource("validation"), "test": SplitSource("test")},
        subjects,
    )
    for name, subjects in MMLU_GROUPS.items()
] + [
    # tiny tasks for the tiny fixture model: every command runs on them in seconds (`compare --preset smoke`)
    TaskSpec("smoke_arith", "arith", "smoke fixture: 'What is a plus b?' (2-4 numeric choices)",
             _official(), packaged=True),
    TaskSpec("smoke_shift", "shift", "smoke fixture: 'What is a times b?', a shifted evaluation set",
             {"validation": SplitSource("validation"), "test": SplitSource("test")}, packaged=True),
]

TASKS: dict[str, TaskSpec] = {task.name: task for task in _TASK_LIST}
