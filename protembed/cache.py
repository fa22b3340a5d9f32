"""Where protembed keeps its own files (FLIP data, feature caches, weight digests)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$PROTEMBED_CACHE`, else `$XDG_CACHE_HOME/protembed`, else `~/.cache/protembed`."""
    env = os.environ.get("PROTEMBED_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "protembed"
