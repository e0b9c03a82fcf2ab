"""Hugging Face Hub ids (`org/name`, `org/name@revision`) resolved to a snapshot folder of the local Hugging Face
cache, asking the Hub only on a miss and never when `HF_HUB_OFFLINE` is set (see `models.py`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from reftkit.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,200}))?$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_HUB_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
_TRUE = {"1", "on", "yes", "true"}


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision)` for a Hub id such as "org/name" or "org/name@v1.0", else None."""
    match = _HUB_ID.match(name)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or match["repo"].endswith((".", "-")):
        return None
    return match["repo"], match["revision"]


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
    else `~/.cache/huggingface/hub` (huggingface_hub reads these once, when it is imported)."""
    configured = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if configured:
        return Path(configured).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether the Hub must not be asked: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set now or when
    huggingface_hub was imported."""
    if any(os.environ.get(key, "").strip().lower() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(any(folder.glob(pattern)) for pattern in _HUB_WEIGHTS)


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of a Hub model in the local Hugging Face cache, downloaded first (configs, tokenizer
    and safetensors weights only) when it is not cached and the Hub may be asked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache = hub_cache_dir()
    shown = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = None
    if folder is not None and _has_weights(folder):
        logger.info("using %s from the Hugging Face cache %s", shown, folder)
        return folder
    missing = ("is not in the local Hugging Face cache" if folder is None else
               f"is only partly in the local Hugging Face cache ({folder} has no config.json or weights)")
    where = (f"{missing} ({cache}; set HF_HUB_CACHE or HF_HOME to use another cache) and it is not a local "
             "folder either")
    if hub_offline():
        raise ModelNotFoundError(
            f"{shown!r} {where}; HF_HUB_OFFLINE is set, so the Hub is not asked: download it once with network "
            f"access (unset HF_HUB_OFFLINE), or pass the path of a local model folder")
    logger.info("downloading %s from the Hugging Face Hub into %s", shown, cache)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=_HUB_FILES))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(
            f"{shown!r} is not a local folder and the Hub has no model repo {repo_id!r} that this machine may read "
            "(check the spelling; for a private or gated repo log in with `hf auth login` or set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"the Hub repo {repo_id!r} has no revision {revision!r}; pass a branch, tag or "
                                 "commit hash that exists") from exc
    except (LocalEntryNotFoundError, OSError) as exc:  # no connection, a timeout, the Hub down
        reason = " ".join(str(exc).split())[:200]
        raise ModelNotFoundError(f"{shown!r} {where}, and the Hugging Face Hub is unreachable ({reason}); connect "
                                 "to the network or pass the path of a local model folder") from exc
    if not _has_weights(folder):
        raise ModelNotFoundError(f"the Hub repo {shown!r} has no config.json or no safetensors weights; reftkit "
                                 "loads transformers models saved as safetensors")
    return folder
