"""Output folders: checked before any work starts, written by one process at a time, no stale temporaries.

    check_writable(output)                 # before loading anything: one line if nothing can be written there
    check_not_in_use(output)               # ... or if another bayeslora process is writing there
    with output_lock(output):              # a second writer refuses in one line instead of interleaving
        remove_stale_temporaries(output)   # what an interrupted write left behind
        ...
    with output_lock(output, wait=True):   # ... or waits its turn, for a short write shared by several processes

The lock is an advisory `flock` on `output/.lock` (POSIX; the standard library's
`fcntl`): the operating system releases it when its process ends, however it
ends (SIGKILL included), so a killed run never leaves a folder locked. (The
`filelock` package wraps the same call, but its fork handlers made a lock held
by `compare` misbehave in the unit processes it forks.)
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from bayeslora.errors import OutputInUseError, UsageError

LOCK_FILE = ".lock"


def check_not_in_use(output: Path) -> None:
    """No other bayeslora process holds the lock of `output` now (a quick look; `output_lock` is the real guard)."""
    if (output / LOCK_FILE).is_file():
        with _locked(output):
            pass


def is_in_use(output: Path) -> bool:
    """Whether another process holds the lock of `output` now (`check_not_in_use` as a question)."""
    try:
        check_not_in_use(output)
    except OutputInUseError:
        return True
    return False


def _in_use(output: Path) -> OutputInUseError:
    return OutputInUseError(f"output {output} is in use by another bayeslora process; "
                            f"wait for it to finish or choose another directory")


@contextmanager
def _locked(output: Path, wait: bool = False) -> Iterator[None]:
    """An exclusive `flock` on the lock file, held inside the block; if another one holds it, refused at once
    (or, `wait`, once it is released)."""
    with open(output / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(output) from None
        yield  # the lock ends when the file is closed, or when the process ends, however it ends


def check_writable(output: Path) -> None:
    """Create and delete a file where `output` is or would be made (permission bits alone mislead root,
    read-only mounts and immutable folders); a `UsageError` if that fails. Writes nothing that stays."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output {output} cannot be created: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise UsageError(f"output {output} is not writable") from None


def holds_files(output: Path) -> bool:
    """Whether `output` holds anything besides the lock file."""
    return output.is_dir() and any(path.name != LOCK_FILE for path in output.iterdir())


@contextmanager
def output_lock(output: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `output` (created if needed) inside the block; `OutputInUseError` if another process has it,
    or, `wait`, block until it is released (for short sections that several processes take in turn).

    A folder this call created and the block left empty (it failed before writing) is removed again.
    """
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    with _locked(output, wait):
        try:
            yield
        finally:
            if created and not holds_files(output):
                (output / LOCK_FILE).unlink(missing_ok=True)
                with suppress(OSError):  # something appeared meanwhile: keep the folder
                    output.rmdir()


def remove_stale_temporaries(output: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Delete what interrupted writes left in `output` and its subfolders, except the subfolders named in
    `exclude` (folders with locks of their own); returns what was removed.

    Every file bayeslora writes is first written under a name starting with "." (a staging file or
    folder) and renamed into place; call this only while holding the folder's lock.
    """
    removed = []
    kept = [entry for entry in output.iterdir() if entry.name not in exclude]  # never walk into an excluded folder
    found = [entry for entry in kept if entry.name.startswith(".")]
    found += [path for entry in kept if entry.is_dir() and not entry.is_symlink() for path in entry.rglob(".*")]
    for path in sorted(found):
        if path.name == LOCK_FILE or not (path.exists() or path.is_symlink()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def empty_folder(output: Path) -> None:
    """Delete everything in `output` except its lock file (replacing a run while holding its lock)."""
    for path in output.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def end_with_parent() -> None:
    """End this process as soon as its parent is gone, however the parent ended (SIGKILL included): a
    daemon thread polls the parent id. Files are written atomically, so what the process leaves resumes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
