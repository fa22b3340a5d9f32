"""The local Hugging Face cache, read without any network call.

The cache is the standard huggingface_hub layout (`$HF_HUB_CACHE`, default `$HF_HOME/hub`):

    models--facebook--esm2_t33_650M_UR50D/
      refs/main                 commit hash the branch pointed to when it was downloaded
      snapshots/<commit>/       one symlink per file, into blobs/
      blobs/<etag>              file contents (sha256 for LFS files such as weights)

A snapshot counts as cached only when it is complete: `config.json` plus every weight file
(and every shard its index names), and no `.protembed-unfinished` marker, which `download` leaves
there until every new file has passed its sha256 check (it holds the revision the download was
started for, so that a stopped download is reported for that revision only). huggingface_hub
writes each file to a temporary name and renames it into place, so a partial download never looks
complete.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

from protembed.cache import user_path
from protembed.errors import CheckpointError, HubError, OptionError
from protembed.models.checkpoints import CONFIG_FILE, memo_sha256, weight_files
from protembed.registry import MODELS


@dataclass(frozen=True)
class CachedModel:
    """A registry model and its cached snapshot, if any."""

    name: str
    repo_id: str
    path: Path | None  # snapshot directory; None when not cached
    revision: str | None  # commit hash
    size: int  # bytes on disk
    partial: bool = False  # not cached, but a download of it stopped before it finished
    other_revisions: tuple[str, ...] = ()  # commits cached besides `main`'s (e.g. from --revision)


UNFINISHED = ".protembed-unfinished"  # in a snapshot whose new files are not all checked yet


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The Hub cache directory: `cache_dir`, else `HF_HUB_CACHE` / `HF_HOME/hub`."""
    root = str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    if not root.strip():
        raise OptionError("the Hub cache directory is empty (--cache-dir, HF_HUB_CACHE or HF_HOME)")
    path = user_path(root)
    if path is None:
        raise OptionError(f"Hub cache directory {root}: no such user {root.split('/', 1)[0]}")
    return path


def repo_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def is_complete(snapshot: Path) -> bool:
    """Whether a snapshot directory holds `config.json` and all its weight files, all checked."""
    if not (snapshot / CONFIG_FILE).is_file() or (snapshot / UNFINISHED).exists():
        return False
    try:
        weight_files(snapshot)
    except CheckpointError:
        return False
    return True


def cached_snapshot(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, str] | None:
    """(snapshot directory, commit hash) of a complete cached snapshot of a repo, or None.

    `revision` is a branch or tag (looked up in `refs/`) or a commit hash; None means `main`.
    """
    rev = revision or constants.DEFAULT_REVISION
    commit = rev if REGEX_COMMIT_HASH.fullmatch(rev) else _ref_commit(repo_id, rev, cache_dir)
    if commit is None:
        return None
    snapshot = repo_dir(repo_id, cache_dir) / "snapshots" / commit
    return (snapshot, commit) if is_complete(snapshot) else None


def damaged_weights(snapshot: Path) -> list[str]:
    """Weight files of a complete snapshot whose bytes no longer hash to their blob's name (the
    Hub's sha256 of an LFS file). Each file is hashed once per change (`memo_sha256`)."""
    bad = []
    for f in weight_files(snapshot):
        blob = f.resolve()
        if re.fullmatch("[0-9a-f]{64}", blob.name) and memo_sha256([blob]) != f"sha256:{blob.name}":
            bad.append(f.name)
    return bad


def cached_commits(repo_id: str, cache_dir: str | Path | None = None) -> list[str]:
    """Commit hashes of the repo's complete cached snapshots, sorted."""
    try:
        found = (repo_dir(repo_id, cache_dir) / "snapshots").iterdir()
        return sorted(p.name for p in found if REGEX_COMMIT_HASH.fullmatch(p.name) and is_complete(p))
    except OSError:
        return []


def _ref_commit(repo_id: str, rev: str, cache_dir: str | Path | None) -> str | None:
    """The commit that branch or tag `rev` named when it was last downloaded; None if never."""
    ref = repo_dir(repo_id, cache_dir) / "refs" / rev
    try:
        if not ref.is_file():
            return None
        return ref.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:  # another user's cache, or damage
        why = exc.strerror if isinstance(exc, OSError) else "not a commit hash"
        raise HubError(f"{ref}: cannot read the cached revision: {why or exc}") from None


def stopped_download(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> bool:
    """Whether the cache holds a snapshot of the repo that a download of `revision` (a commit hash,
    or a branch or tag; None means `main`) started and did not finish: files missing or not all
    checked yet. For a branch or tag, that is the snapshot its ref names, or one whose marker names
    it; a snapshot without a revision in its marker (a download stopped before the marker was
    written, or one by another tool) counts for every branch and tag."""
    snapshots = repo_dir(repo_id, cache_dir) / "snapshots"
    try:
        found = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return False
    rev = revision or constants.DEFAULT_REVISION
    if REGEX_COMMIT_HASH.fullmatch(rev):
        return any(p.name == rev and not is_complete(p) for p in found)
    known = _ref_commit(repo_id, rev, cache_dir)  # whatever the snapshot's marker says
    return any(not is_complete(p) and (p.name == known or _started_for(p) in ("", rev)) for p in found)


def _started_for(snapshot: Path) -> str:
    """The revision a snapshot's unfinished download was started for; "" when not known."""
    try:
        return (snapshot / UNFINISHED).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def mark_unfinished(snapshot: Path, revision: str | None) -> None:
    """Mark a snapshot as not cached until its files are checked, recording the revision asked for."""
    (snapshot / UNFINISHED).write_text(revision or constants.DEFAULT_REVISION)


def write_ref(repo_id: str, revision: str | None, commit: str, cache_dir: str | Path | None = None) -> None:
    """Record the commit a branch or tag resolved to (`refs/<revision>`), so later lookups need no network."""
    rev = revision or constants.DEFAULT_REVISION
    if rev == commit:
        return
    ref = repo_dir(repo_id, cache_dir) / "refs" / rev
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)  # atomic: a reader never sees a half-written ref


def disk_size(snapshot: Path) -> int:
    """Bytes on disk of the files of a snapshot (symlinks followed, each blob counted once)."""
    seen: set[str] = set()
    total = 0
    for root, _, files in os.walk(snapshot):
        for f in files:
            real = os.path.realpath(os.path.join(root, f))
            if real not in seen and os.path.isfile(real):
                seen.add(real)
                total += os.path.getsize(real)
    return total


def remove_stale_partials(snapshot: Path) -> list[Path]:
    """Delete the partial files (`blobs/*.incomplete`) of the snapshot's repo that no download is
    writing: huggingface_hub names them per process and never resumes another process's, so one
    left by a killed run only takes disk space. A file written to within a few download timeouts
    may be another process's download in progress, and is kept. Returns what was deleted."""
    quiet_for = max(60.0, 3 * float(constants.HF_HUB_DOWNLOAD_TIMEOUT))
    now, removed = time.time(), []
    try:
        partials = list((snapshot.parent.parent / "blobs").glob("*.incomplete"))
    except OSError:
        return []
    for path in partials:
        try:
            if now - path.stat().st_mtime > quiet_for:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already, or another user's file: not ours to clean
            continue
    return removed


def remove_files(snapshot: Path, names: list[str]) -> None:
    """Delete files of a snapshot and the blobs they point to (used on corrupt downloads)."""
    for name in names:
        pointer = snapshot / name
        blob = pointer.resolve()
        pointer.unlink(missing_ok=True)
        if blob != pointer:
            blob.unlink(missing_ok=True)


def cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Every registry model with its cached snapshot of `main` and any other cached commits, in
    registry order."""
    rows = []
    for info in MODELS.values():
        hit = cached_snapshot(info.repo_id, cache_dir=cache_dir)
        path, revision = hit if hit else (None, None)
        size = disk_size(path) if path else 0
        partial = hit is None and stopped_download(info.repo_id, cache_dir=cache_dir)
        others = tuple(c for c in cached_commits(info.repo_id, cache_dir) if c != revision)
        rows.append(CachedModel(info.name, info.repo_id, path, revision, size, partial, others))
    return rows
