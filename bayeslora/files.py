"""Atomic file writing: every result, checkpoint file, adapter, table and plot goes through `write_atomically`.

A reader (or a rerun after a crash) sees either the previous complete file or
the new complete file, never a partial one: the bytes go to a temporary file in
the same folder (so the rename stays on one file system), are flushed to disk
(fsync), and the temporary file is renamed over the target (`os.replace`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` through a synced temporary file and a rename."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_files_atomically(directory: str | Path, save: Callable[[Path], None]) -> None:
    """Let `save` write its files (e.g. peft's `save_pretrained`) into a staging folder inside `directory`,
    then write each of them into `directory` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".staging-") as staging:
        save(Path(staging))
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(target, path.read_bytes())
