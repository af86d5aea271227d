"""Benchmark questions from the Hugging Face Hub via `datasets` (for machines with Hub access)."""

from __future__ import annotations

from bayeslora.errors import UsageError
from bayeslora.tasks.question import Question
from bayeslora.tasks.rows import questions_from_rows

# family -> (Hub dataset id, configuration); MMLU's configuration is the subject
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "boolq": ("google/boolq", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "mmlu": ("cais/mmlu", None),
}


def load_hub(family: str, split: str, subjects: tuple[str, ...] = ()) -> list[Question]:
    """All questions of one source split, in the dataset's own order."""
    from datasets import load_dataset

    dataset_id, config = HUB_DATASETS[family]
    try:
        if family == "mmlu":
            questions = []
            for subject in subjects:
                questions += questions_from_rows(family, load_dataset(dataset_id, subject, split=split), split)
            return questions
        return questions_from_rows(family, load_dataset(dataset_id, config, split=split), split)
    except (ConnectionError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot load {dataset_id} from the Hugging Face Hub: {first_line}") from error
