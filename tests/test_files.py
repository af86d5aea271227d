"""The one atomic-write helper: complete new content or the old content, never a partial file or a stray temporary."""

import pytest

from bayeslora.files import write_atomically


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_atomically(target, "first")
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_previous_content(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("previous")
    with pytest.raises(TypeError):
        write_atomically(target, 12345)  # not bytes: fails inside the write, after the temporary file exists
    assert target.read_text() == "previous"
    assert [path.name for path in tmp_path.iterdir()] == ["table.md"]
