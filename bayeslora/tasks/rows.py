"""Hugging Face dataset rows -> `Question`s, one converter per dataset family.

Used by the Hub loader, and by the offline loader for the datasets the
offline package ships in Hugging Face form (MMLU) or with the raw fields
(Winogrande), so both sources yield the same questions and ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bayeslora.tasks.question import Question

Row = Mapping[str, Any]


def lettered_choices_question(row: Row, stem_field: str) -> Question:
    """ARC and OpenBookQA rows: choices as {"label": [...], "text": [...]} and a letter `answerKey`."""
    labels = list(row["choices"]["label"])
    return Question(
        id=row["id"],
        question=row[stem_field],
        choices=tuple(row["choices"]["text"]),
        answer=labels.index(row["answerKey"]),
    )


def arc_question(row: Row, position: int, split: str) -> Question:
    return lettered_choices_question(row, "question")


def openbookqa_question(row: Row, position: int, split: str) -> Question:
    return lettered_choices_question(row, "question_stem")


def boolq_question(row: Row, position: int, split: str) -> Question:
    """google/boolq rows: `answer` True means "yes" (choice 0)."""
    return Question(
        id=f"boolq/{split}/{position}",
        question=row["question"] + "?",
        choices=("yes", "no"),
        answer=0 if row["answer"] else 1,
        context=row["passage"],
    )


def winogrande_question(row: Row, position: int, split: str) -> Question:
    """The blank `_` is shown as `___`; the two options fill it; `answer` is "1" or "2"."""
    return Question(
        id=f"winogrande/{split}/{position}",
        question="Fill in the blank: " + row["sentence"].replace("_", "___", 1),
        choices=(row["option1"], row["option2"]),
        answer=int(row["answer"]) - 1,
    )


def mmlu_question(row: Row, position: int, split: str) -> Question:
    return Question(
        id=f"{row['subject']}/{split}/{position}",
        question=row["question"],
        choices=tuple(row["choices"]),
        answer=int(row["answer"]),
    )


CONVERTERS: dict[str, Callable[[Row, int, str], Question]] = {
    "arc_easy": arc_question,
    "arc_challenge": arc_question,
    "openbookqa": openbookqa_question,
    "boolq": boolq_question,
    "winogrande": winogrande_question,
    "mmlu": mmlu_question,
}


def questions_from_rows(family: str, rows: Iterable[Row], split: str) -> list[Question]:
    convert = CONVERTERS[family]
    return [convert(row, position, split) for position, row in enumerate(rows)]
