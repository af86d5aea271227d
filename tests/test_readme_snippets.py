"""The README's "Use it from…" snippets run as written, on a run folder of the committed fixture.

A snippet is the fenced python block after a `<!-- snippet: NAME -->` line. The only substitution is
the Hub id of the base model, which becomes the fixture model's folder (no Hub access in tests).
"""

import re
import shutil
from pathlib import Path

import pytest

from bayeslora.presets import FIXTURE_MODEL
from tests.test_runs_restore import TEST, train_run

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)```", re.DOTALL)


def snippets() -> dict[str, str]:
    return {match["name"]: match["code"] for match in SNIPPET.finditer(README.read_text())}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding runs/default (a Bayesian-LoRA run) and my_questions.jsonl, as the snippets expect."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "runs").mkdir()
    train_run(folder / "runs" / "default", "bayeslora")
    shutil.copy(TEST, folder / "my_questions.jsonl")
    return folder


@pytest.mark.parametrize("name", ["python-load-run", "plain-peft"])
def test_snippet_runs(name, workdir, monkeypatch, capsys):
    code = snippets()[name].replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(FIXTURE_MODEL)))
    monkeypatch.chdir(workdir)
    exec(compile(code, f"README.md:{name}", "exec"), {})
