"""Where a saved adapter lives: a local folder or a Hub repository, resolved the way peft resolves it.

    read_adapter_config("runs/my-adapter")           # a local folder
    read_adapter_config("someone/bayes-adapter")     # a Hub id: the Hub cache, else a download

A local folder holding `adapter_config.json` wins; anything else is taken as a
Hub id and its files come through `huggingface_hub.hf_hub_download` (the
cache first; `HF_HUB_OFFLINE=1` reads only the cache), as in peft's
`PeftConfig.from_pretrained` and `load_peft_weights`. `subfolder`, `revision`,
`token` and `cache_dir` are passed on. Every failure is a `UsageError`
naming the adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bayeslora.errors import UsageError

CONFIG_NAME = "adapter_config.json"


def adapter_file(name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_options: Any) -> Path:
    """The local path of `filename` of the adapter `name_or_path` (downloaded into the Hub cache when needed)."""
    local = Path(name_or_path).expanduser() / (subfolder or "")
    if local.is_dir():
        if not (local / filename).is_file():
            raise UsageError(f"adapter folder {str(local)!r} has no {filename}")
        return local / filename
    if Path(name_or_path).expanduser().exists() or str(name_or_path).startswith((".", "/", "~")):
        raise UsageError(f"adapter {str(name_or_path)!r} is not a folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(name_or_path), filename, subfolder=subfolder, **hub_options))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"adapter {str(name_or_path)!r} is not a local folder, and its {filename} cannot be had from the Hub ({reason})"
        ) from None


def read_adapter_config(name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_options: Any) -> dict[str, Any]:
    """The saved `adapter_config.json` of a local or Hub adapter, as a dict."""
    path = adapter_file(name_or_path, CONFIG_NAME, subfolder, **hub_options)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{path} is not a readable JSON adapter config") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not an adapter config (a JSON object)")
    return config
