"""How failures of a download reach the user: one line that says whether the network, the Hub or
the local disk is at fault and what to do, and huggingface_hub's warnings shown as one line each."""

from __future__ import annotations

import errno
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import constants, get_token
from huggingface_hub.errors import (
    GatedRepoError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from rich.console import Console

from protembed.cache import ensure_dir
from protembed.errors import RERUN, HubError, StoreError

_console = Console(stderr=True, emoji=False)


def check_writable(root: Path) -> None:
    """HubError, before any request, when the cache folder cannot be created or written."""
    try:
        ensure_dir(root, "Hub cache folder")
    except StoreError as exc:
        raise HubError(f"{exc}; choose another with --cache-dir or HF_HUB_CACHE") from None


@contextmanager
def hub_warnings(show: bool) -> Iterator[None]:
    """huggingface_hub's log messages below ERROR and its Python warnings (such as too little free
    disk space), only when `show`, each warning as one line."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    if not show:
        hub_logger.setLevel(logging.ERROR)

    def one_line(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        _console.print(f"warning: {_first_line(Exception(str(message)))}", highlight=False, markup=False)

    try:
        with warnings.catch_warnings():
            if show:
                warnings.showwarning = one_line
            else:
                warnings.simplefilter("ignore")
            yield
    finally:
        hub_logger.setLevel(level)


# failures of the local disk, not of the download: running the command again does not help
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


@contextmanager
def hub_errors(repo_id: str, revision: str | None, cache: Path | None = None) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one-line HubErrors that say what to do."""
    try:
        yield
    except GatedRepoError:
        page = f"{constants.ENDPOINT}/{repo_id}"
        if get_token() is None:
            raise HubError(f"{repo_id} is gated: accept its terms at {page}, then set HF_TOKEN") from None
        raise HubError(f"{repo_id} is gated and HF_TOKEN has no access: accept its terms at {page}") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"repo '{repo_id}' not found on {constants.ENDPOINT} and no local directory of that name "
            "(check the id; a private repo needs HF_TOKEN)"
        ) from None
    except RemoteEntryNotFoundError as exc:
        raise HubError(f"{repo_id}: file missing on the Hub ({_first_line(exc)})") from None
    except OfflineModeIsEnabled:
        raise HubError(f"{repo_id}: HF_HUB_OFFLINE is set; set HF_HUB_OFFLINE=0 to download") from None
    except httpx2.TimeoutException:
        raise HubError(
            f"no answer from {constants.ENDPOINT} for {repo_id} (timed out); check the network "
            f"(and HF_ENDPOINT), then {RERUN}"
        ) from None
    except OSError as exc:
        if cache is not None and exc.errno in _DISK_FULL + _DISK_DENIED:
            where = f"cannot write {repo_id} into {cache}: {exc.strerror}"
            if exc.errno in _DISK_FULL:
                advice = "free some space (or choose another cache with --cache-dir or HF_HUB_CACHE)"
                raise HubError(f"{where}; {advice}, then {RERUN} to resume") from None
            raise HubError(f"{where}; choose another cache with --cache-dir or HF_HUB_CACHE") from None
        raise HubError(f"download of {repo_id} failed: {_first_line(exc)}; {RERUN} to resume") from None
    except httpx2.HTTPError as exc:
        raise HubError(f"download of {repo_id} failed: {_first_line(exc)}; {RERUN} to resume") from None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
