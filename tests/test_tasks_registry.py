"""Task registry, roles and the user JSONL loader (no offline package needed)."""

import json

import pytest

from bayeslora.errors import UsageError
from bayeslora.tasks import TASKS, load_task, load_task_file
from bayeslora.tasks.question import Question
from bayeslora.tasks.registry import HELD_OUT_SIZE, MMLU_GROUPS

FIXTURES = "bayeslora/tasks/fixtures"
ISSUE_TASKS = {"arc_easy", "arc_challenge", "openbookqa", "boolq", "winogrande_s", "winogrande_m",
               "mmlu_chem", "mmlu_phys", "mmlu_cs", "mmlu_eng", "mmlu_law", "mmlu_health"}


def test_registry_holds_the_issue_tasks_each_with_a_test_role():
    assert ISSUE_TASKS <= set(TASKS)
    for spec in TASKS.values():
        assert "test" in spec.roles and "validation" in spec.roles


def test_held_out_validation_never_overlaps_the_training_positions():
    for name in ("boolq", "winogrande_s", "winogrande_m"):
        roles = TASKS[name].roles
        train, validation = roles["train"].subset, roles["validation"].subset
        assert roles["train"].split == roles["validation"].split == "train"
        assert train.stop <= validation.start and validation.stop - validation.start == HELD_OUT_SIZE
        assert roles["test"].split == "validation"  # no labelled test split: official validation is evaluated
    assert TASKS["winogrande_s"].roles["train"].subset.stop == 640
    assert TASKS["winogrande_m"].roles["train"].subset.stop == 2558


def test_mmlu_groups_are_evaluation_only():
    for name in MMLU_GROUPS:
        assert "train" not in TASKS[name].roles
    with pytest.raises(UsageError, match="has no 'train' split"):
        load_task("mmlu_chem", "train")


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(UsageError, match="unknown task 'arc_medium'; valid tasks: arc_easy, arc_challenge"):
        load_task("arc_medium")


@pytest.mark.parametrize("limit", [0, -3])
def test_non_positive_limit_is_refused(limit):
    with pytest.raises(UsageError, match="limit must be at least 1"):
        load_task("arc_easy", limit=limit)


def test_unknown_source_is_refused():
    with pytest.raises(UsageError, match="unknown source 'ftp'"):
        load_task("arc_easy", source="ftp")


def test_fixture_file_loads_with_default_ids_and_context():
    questions = load_task_file(f"{FIXTURES}/questions.jsonl")
    assert len(questions) == 8
    assert questions[0] == Question(
        "water-boils",
        "At sea level, water boils at which temperature?",
        ("50 degrees Celsius", "100 degrees Celsius", "150 degrees Celsius", "200 degrees Celsius"),
        1,
    )
    assert questions[4].id == "questions.jsonl:5"
    assert questions[5].context.startswith("Rain falls")
    assert sorted({len(question.choices) for question in questions}) == [2, 3, 4, 5]


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 0', r"data.jsonl line 3: malformed JSON"),
        (json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}), r"line 3: answer index 2 is out of range for 2"),
        (json.dumps({"question": "q", "choices": ["a"], "answer": 0}), r"line 3: 1 choice\(s\); at least two"),
        (json.dumps({"question": "q", "answer": 0}), r"line 3: missing field\(s\) choices"),
        (json.dumps({"question": "q", "choices": ["a", "b"], "answer": "0"}), r"line 3: 'answer' must be an integer"),
        (json.dumps(["q"]), r"line 3: expected a JSON object"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, bad_line, message):
    path = _write(tmp_path, [GOOD, "", bad_line, GOOD])  # the blank line 2 is skipped but counted
    with pytest.raises(UsageError, match=message):
        load_task_file(path)


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="holds no questions"):
        load_task_file(_write(tmp_path, [""]))
    with pytest.raises(UsageError, match="does not exist"):
        load_task_file(tmp_path / "absent.jsonl")


def test_question_checks_its_own_answer_and_choices():
    with pytest.raises(UsageError, match="answer index -1 is out of range"):
        Question("x", "q", ("a", "b"), -1)
    with pytest.raises(UsageError, match="at least two"):
        Question("x", "q", (), 0)


def test_unreachable_hub_is_a_usage_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="cannot load allenai/ai2_arc from the Hugging Face Hub: Couldn't reach"):
        load_task("arc_easy", source="hub")
