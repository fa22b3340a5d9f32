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
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from rich.console import Console

from protembed.cache import ensure_dir
from protembed.errors import RERUN, HubError, StoreError
from protembed.hub_cache import cache_root, cached_commits, stopped_download

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
        text = f"warning: {_first_line(Exception(str(message)))}"
        _console.print(text, highlight=False, markup=False, soft_wrap=True)  # one line in a log too

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
KEPT = "files already downloaded are kept"  # a file that failed starts over in the next run


@contextmanager
def hub_errors(repo_id: str, revision: str | None, cache: Path | None = None) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one-line HubErrors that say what to do."""
    try:
        yield
    except Exception as exc:
        # With force_download, huggingface_hub wraps the failure of a file's first request in a
        # plain ValueError ("Force download failed ..."): the cause is what went wrong.
        cause = exc.__cause__
        failure = cause if type(exc) is ValueError and isinstance(cause, Exception) else exc
        translated = _hub_error(failure, repo_id, revision, cache)
        if translated is None:
            raise
        raise translated from None


def _hub_error(exc: Exception, repo_id: str, revision: str | None, cache: Path | None) -> HubError | None:
    """The one-line HubError for a download failure; None for an error that is not one."""
    if isinstance(exc, GatedRepoError):
        page = f"{constants.ENDPOINT}/{repo_id}"
        if get_token() is None:
            return HubError(f"{repo_id} is gated: accept its terms at {page}, then set HF_TOKEN")
        return HubError(f"{repo_id} is gated and HF_TOKEN has no access: accept its terms at {page}")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision '{revision}'")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"repo '{repo_id}' not found on {constants.ENDPOINT} and no local directory of that name "
            "(check the id; a private repo needs HF_TOKEN)"
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"{repo_id}: file missing on the Hub ({_first_line(exc)})")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"{repo_id}: HF_HUB_OFFLINE is set; set HF_HUB_OFFLINE=0 to download")
    if isinstance(exc, httpx2.TimeoutException):
        return HubError(
            f"no answer from {constants.ENDPOINT} for {repo_id} (timed out); check the network "
            f"(and HF_ENDPOINT), then {RERUN}"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403, 404):  # running it again would not help
        why = "check the repo id and revision" if status == 404 else "check HF_TOKEN and your access"
        return HubError(f"download of {repo_id} failed: {_first_line(exc)}; {why}")
    if isinstance(exc, OSError):
        if cache is not None and exc.errno in _DISK_FULL + _DISK_DENIED:
            where = f"cannot write {repo_id} into {cache}: {exc.strerror}"
            if exc.errno in _DISK_FULL:
                advice = "free some space (or choose another cache with --cache-dir or HF_HUB_CACHE)"
                return HubError(f"{where}; {advice}, then {RERUN} ({KEPT})")
            return HubError(f"{where}; choose another cache with --cache-dir or HF_HUB_CACHE")
        return HubError(f"download of {repo_id} failed: {_first_line(exc)}; {RERUN} ({KEPT})")
    if isinstance(exc, httpx2.HTTPError):
        check = "check the network (and HF_ENDPOINT), then " if isinstance(exc, httpx2.ConnectError) else ""
        return HubError(f"download of {repo_id} failed: {_first_line(exc)}; {check}{RERUN} ({KEPT})")
    return None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def not_cached_error(
    model: str, repo_id: str, revision: str | None, cache_dir: str | Path | None, for_download: bool = False
) -> HubError:
    """The error for a model that is not in the cache when it cannot or may not be downloaded:
    what is in the cache instead, and the command that fixes it."""
    cmd = f"protembed download {model}"
    cmd += f" --revision {revision}" if revision else ""
    cmd += f" --cache-dir {cache_dir}" if cache_dir is not None else ""
    root = cache_root(cache_dir)
    where, other = f"{repo_id} is not in the cache ({root})", ""
    if stopped_download(repo_id, revision, cache_dir):
        where = f"{repo_id} is only partly in the cache ({root}: a download stopped before it finished)"
    elif held := cached_commits(repo_id, cache_dir):  # e.g. downloaded with --revision COMMIT only
        where = f"{repo_id} at revision {revision or constants.DEFAULT_REVISION} is not in the cache ({root})"
        other = f"; --revision {held[0]} uses the cached copy"
        if len(held) > 1:
            listed = ", ".join(held[:3]) + ", ..." * (len(held) > 3)
            other = f"; cached revisions: {listed} (pick one with --revision)"
    if not constants.is_offline_mode():
        return HubError(f"{where} and downloads are off: run `{cmd}`{other}")
    if for_download:  # running `{cmd}` again would not help
        return HubError(
            f"{where} and HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to download{other}"
        )
    return HubError(
        f"{where} and HF_HUB_OFFLINE is set: run `HF_HUB_OFFLINE=0 {cmd}` first (it needs the network){other}"
    )
