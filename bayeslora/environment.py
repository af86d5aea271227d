"""The library versions a result was produced with, recorded beside it (results.json, training.json).

run.json is what defines a run (a resume must match it), so the versions stay out of it: a run resumed after
an upgrade is the same run, and its results say which versions finished it.
"""

from __future__ import annotations

import platform
from importlib import metadata

#: the distributions whose versions can change a result
RECORDED = ("bayeslora", "torch", "transformers", "peft", "accelerate")


def library_versions() -> dict[str, str | None]:
    """Python's version and each of `RECORDED`'s installed version (None where it is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
