"""Hugging Face Hub ids (`owner/name`) -> a local snapshot folder, preferring the local cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download

from sslam_core.errors import SslamError

DEFAULT_TAGGER = "ta012/SSLAM_AS2M_Finetuned"
DEFAULT_ENCODER = "ta012/SSLAM_pretrain"
HUB_FILES = ["config.json", "model.safetensors"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubUnavailable(SslamError, RuntimeError):
    """A hub id that is neither cached nor downloadable (offline, unknown repo, no network)."""


def looks_like_hub_id(text: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it only once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def snapshot(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of a cached or freshly downloaded snapshot of `repo_id` (config.json + weights)."""
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache_dir, local_files_only=True)
        )
    except Exception:  # not cached (huggingface_hub raises several error types for this)
        pass
    advice = "pass a local checkpoint path instead (a fairseq .pt file or a folder)"
    if hub_offline():
        raise HubUnavailable(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; {advice}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache_dir))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubUnavailable(
            f"{repo_id}: cannot download from the Hugging Face Hub ({reason}); {advice}"
        ) from None


__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_TAGGER",
    "HubUnavailable",
    "hub_offline",
    "looks_like_hub_id",
    "snapshot",
]
