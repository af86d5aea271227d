"""One multiple-choice question, the unit every loader produces and every scorer consumes."""

from __future__ import annotations

from dataclasses import dataclass

from bayeslora.errors import UsageError


@dataclass(frozen=True)
class Question:
    """A multiple-choice question with its gold answer.

    `context` is optional text shown before the question (BoolQ's passage);
    `answer` is the 0-based index of the correct choice.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    context: str = ""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise UsageError(f"question {self.id!r} has {len(self.choices)} choice(s); at least two are needed")
        if not 0 <= self.answer < len(self.choices):
            raise UsageError(
                f"question {self.id!r}: answer index {self.answer} is out of range for {len(self.choices)} choices"
            )
