"""A user's own questions: one JSON object per line.

    {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1, "id": "sum-1"}

`choices` is a list of at least two strings, `answer` the 0-based index of
the correct one; `id` (optional) defaults to "<file name>:<line number>";
`context` (optional) is text shown before the question. Blank lines are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from bayeslora.errors import UsageError
from bayeslora.tasks.question import Question

REQUIRED_FIELDS = ("question", "choices", "answer")


def _question_from_record(record: object, where: str, default_id: str) -> Question:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise UsageError(f"{where}: missing field(s) {', '.join(missing)}")
    choices, answer = record["choices"], record["answer"]
    if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
        raise UsageError(f"{where}: 'choices' must be a list of strings")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise UsageError(f"{where}: 'answer' must be an integer index, got {answer!r}")
    if len(choices) < 2:
        raise UsageError(f"{where}: {len(choices)} choice(s); at least two are needed")
    if not 0 <= answer < len(choices):
        raise UsageError(f"{where}: answer index {answer} is out of range for {len(choices)} choices")
    return Question(
        id=str(record.get("id", default_id)),
        question=str(record["question"]),
        choices=tuple(choices),
        answer=answer,
        context=str(record.get("context", "")),
    )


def load_task_file(path: str | Path) -> list[Question]:
    """All questions of a JSONL file; a `UsageError` names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"task file {str(path)!r} does not exist")
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{where}: malformed JSON ({error.msg})") from None
            questions.append(_question_from_record(record, where, f"{path.name}:{number}"))
    if not questions:
        raise UsageError(f"task file {str(path)!r} holds no questions")
    return questions


#: the package's own small tasks (the smoke preset's): <family>_<split>.jsonl
PACKAGED = Path(__file__).resolve().parents[1] / "fixtures" / "smoke"


def load_packaged(family: str, split: str, subjects: tuple[str, ...] = ()) -> list[Question]:
    """A split of a task shipped with the package, the same whatever the source."""
    return load_task_file(PACKAGED / f"{family}_{split}.jsonl")
