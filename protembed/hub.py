"""Model resolution and download: registry name, Hub repo id or local directory -> checkpoint directory.

Downloads go through huggingface_hub into the standard cache, so `HF_HOME`, `HF_HUB_CACHE`,
`HF_HUB_OFFLINE`, `HF_ENDPOINT` and `HF_TOKEN` behave as they do for every other Hub tool. Only the
files protembed reads are fetched: `config.json`, the tokenizer files and one weight format
(safetensors when the repo has it, else `pytorch_model.bin`; a shard index and its shards for
large models). Remote-code `.py` files are never fetched. The architecture is checked from
`config.json` before any weights are downloaded; after the download each new LFS file is checked
against its sha256 and the checkpoint against its config (every key and shape), and weights that
fail are deleted from the cache so that they never look complete. A cached copy's weights are
checked against their sha256 on every use, hashed once per file change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from protembed import __version__
from protembed.cache import user_path
from protembed.errors import CheckpointError, HubError, UnknownModelError
from protembed.hub_cache import (
    UNFINISHED,
    cache_root,
    cached_snapshot,
    damaged_weights,
    disk_size,
    is_complete,
    mark_unfinished,
    remove_files,
    remove_stale_partials,
    stopped_download,
    write_ref,
)
from protembed.hub_errors import check_writable, hub_errors, hub_warnings, not_cached_error
from protembed.models.checkpoints import (
    CONFIG_FILE,
    WEIGHT_FILES,
    config_from_dict,
    local_checkpoint,
    memo_sha256,
    verify_checkpoint,
)
from protembed.models.encoder import EncoderConfig
from protembed.registry import MODELS, lookup, suggest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

_console = Console(stderr=True, emoji=False)
# seconds without an answer from the Hub before a request fails (huggingface_hub waits forever for
# repo metadata, and 10 s for files); HF_HUB_ETAG_TIMEOUT raises it
_TIMEOUT = max(20.0, float(constants.HF_HUB_ETAG_TIMEOUT))


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's checkpoint lives on disk, and where it came from."""

    name: str | None  # registry name if it is one, else None
    source: str  # Hub repo id, or absolute local path
    path: Path  # local snapshot directory holding config.json + weights
    revision: str  # commit hash (Hub) or "local"


def parse_model(model: str) -> tuple[str | None, str]:
    """(registry name or None, Hub repo id) of a model that is not a local directory.

    Callers try `local_checkpoint` first, so a path that exists here is not a directory.
    """
    info = lookup(model)
    if info is not None:
        return info.name, info.repo_id
    path = user_path(model)  # None for ~name of an unknown user
    if path is not None and path.exists():  # callers took directories; `-m proteins.fasta`
        what = "a file, not a model name or checkpoint folder" if path.is_file() else "not a directory"
        raise UnknownModelError(model, list(MODELS), what)
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:  # meant as a folder
        raise UnknownModelError(model, list(MODELS), "no such directory")
    if model.count("/") == 1:
        try:
            validate_repo_id(model)
        except HFValidationError:
            hint = "not a local directory, registry name or Hub repo id"
            raise UnknownModelError(model, list(MODELS), hint) from None
        return None, model
    close = suggest(model)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    hint += "`protembed models` lists the names; a Hub repo id (org/name) or a local directory also works"
    raise UnknownModelError(model, list(MODELS), hint)


def resolve_model(
    model: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    progress: bool = True,
    on_config: Callable[[EncoderConfig], None] | None = None,
) -> ResolvedModel:
    """Find a model's checkpoint directory: a local directory, else the cache, else download it.

    A cached snapshot is used without any network call. A model that is not cached is downloaded
    (with a notice on stderr when `progress` is on) unless `download` is False or `HF_HUB_OFFLINE`
    is set; `on_config` then sees its configuration before the weights are fetched, and may raise
    to stop there.
    """
    local = local_checkpoint(model, revision)
    if local is not None:
        return ResolvedModel(None, str(local), local, "local")
    name, repo_id = parse_model(model)
    hit = cached_snapshot(repo_id, revision, cache_dir)
    if hit is not None:
        _check_intact(model, repo_id, hit[0])
        return ResolvedModel(name, repo_id, hit[0], hit[1])
    if constants.is_offline_mode() or not download:
        raise not_cached_error(model, repo_id, revision, cache_dir)
    at = f" at revision {revision}" if revision else ""
    if progress:
        state = "is not cached: downloading"
        if stopped_download(repo_id, revision, cache_dir):
            state = "is only partly cached: finishing the download of"
        _console.print(
            f"{name or repo_id}{at} {state} {repo_id} into {cache_root(cache_dir)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    resolved, _ = _download(name, repo_id, revision, cache_dir, False, progress, on_config)
    return resolved


def download_model(
    model: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[ResolvedModel, int]:
    """Download a model into the Hub cache (no network if it is already cached) and verify it: it
    loads, and its weights hash to the Hub's sha256 (a cached copy's once per file change).

    Returns the resolved model and its size on disk in bytes. `force` downloads every file again.
    """
    local = local_checkpoint(model, revision)
    if local is not None:
        verify_checkpoint(local)
        return ResolvedModel(None, str(local), local, "local"), disk_size(local)
    name, repo_id = parse_model(model)
    hit = None if force else cached_snapshot(repo_id, revision, cache_dir)
    if hit is not None:
        try:
            verify_checkpoint(hit[0])
        except CheckpointError as exc:
            reason = f"cached copy does not load: {_detail(exc, hit[0])}"
            raise CheckpointError(repo_id, f"{reason}; run `protembed download {model} --force`") from None
        _check_intact(model, repo_id, hit[0])
        return ResolvedModel(name, repo_id, hit[0], hit[1]), disk_size(hit[0])
    if constants.is_offline_mode():
        if force:
            raise HubError("--force needs the network but HF_HUB_OFFLINE is set; set HF_HUB_OFFLINE=0")
        raise not_cached_error(model, repo_id, revision, cache_dir, for_download=True)
    return _download(name, repo_id, revision, cache_dir, force, progress)


def _check_intact(model: str, repo_id: str, snapshot: Path) -> None:
    """CheckpointError if a cached snapshot's weights no longer hash to the Hub's sha256 (a byte
    changed in place: the file still loads). Hashed once per file change (`memo_sha256`)."""
    if bad := damaged_weights(snapshot):
        reason = f"cached copy is damaged ({', '.join(bad)}: sha256 mismatch)"
        raise CheckpointError(repo_id, f"{reason}; run `protembed download {model} --force`")


def _sha256(path: Path) -> str:
    """A file's sha256 (hex), remembered per file change so that a later use of the cached copy
    (`_check_intact`) does not hash it again."""
    return memo_sha256([path]).removeprefix("sha256:")


def _download(
    name: str | None,
    repo_id: str,
    revision: str | None,
    cache_dir: str | Path | None,
    force: bool,
    progress: bool,
    on_config: Callable[[EncoderConfig], None] | None = None,
) -> tuple[ResolvedModel, int]:
    """Fetch a checkpoint's files into the HF cache and verify them; huggingface_hub's own
    warnings (retries, resumes) are shown only with `progress`."""
    with hub_warnings(progress):
        root = cache_root(cache_dir)
        check_writable(root)
        cache = str(root)
        api = HfApi(library_name="protembed", library_version=__version__)
        with hub_errors(repo_id, revision):
            info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=_TIMEOUT)
        commit = str(info.sha)
        remote = {s.rfilename: s for s in info.siblings or []}
        if CONFIG_FILE not in remote:
            raise CheckpointError(repo_id, "no config.json (not a Hugging Face checkpoint repo)")

        def fetch(filename: str, bar: type | None = None) -> Path:
            with hub_errors(repo_id, revision, root):
                return Path(
                    hf_hub_download(
                        repo_id,
                        filename,
                        revision=commit,
                        cache_dir=cache,
                        force_download=force,
                        library_name="protembed",
                        library_version=__version__,
                        tqdm_class=bar,
                    )
                )

        config_path = fetch(CONFIG_FILE)
        snapshot = config_path.parent
        try:
            config = config_from_dict(json.loads(config_path.read_text()), repo_id)  # before any weights
        except json.JSONDecodeError as exc:
            raise CheckpointError(repo_id, f"config.json is not valid JSON ({exc})") from None
        if on_config is not None:
            on_config(config)
        weights = _weight_names(repo_id, set(remote), fetch)
        wanted = [f for f in TOKENIZER_FILES if f in remote] + weights
        was_complete = is_complete(snapshot)  # checked before: a failed --force leaves it so
        mark_unfinished(snapshot, revision)  # not cached until every file below passed its check
        remove_stale_partials(snapshot)  # a killed run's partial files: never resumed, only in the way
        todo = [f for f in wanted if force or not (snapshot / f).exists()]
        unchecked = None  # a file fetched (so replaced in the snapshot) whose check has not passed yet
        try:
            # Files already here come from an earlier run that may have stopped before checking them.
            todo += _failed_checks(snapshot, [f for f in wanted if f not in todo], remote, progress)
            if todo:
                with _progress_bar(progress) as add_task:
                    bar = _bar_class(add_task(sum(remote[f].size or 0 for f in todo), name or repo_id))
                    for f in todo:
                        unchecked = path = fetch(f, bar)  # a failed fetch leaves the file as it was
                        lfs = remote[f].lfs
                        if lfs is not None and _sha256(path) != lfs.sha256:
                            remove_files(snapshot, [f])
                            reason = "corrupt download (sha256 mismatch), deleted; run the command again"
                            raise CheckpointError(f"{repo_id}/{f}", reason)
                        unchecked = None
        except BaseException:
            if was_complete and unchecked is None and all((snapshot / f).exists() for f in wanted):
                (snapshot / UNFINISHED).unlink(missing_ok=True)  # every file is one that passed a check
            raise
        try:
            verify_checkpoint(snapshot)
        except CheckpointError as exc:
            remove_files(snapshot, weights)  # never leave weights that look complete but do not load
            raise CheckpointError(repo_id, f"{_detail(exc, snapshot)} (deleted from the cache)") from None
        (snapshot / UNFINISHED).unlink(missing_ok=True)
        write_ref(repo_id, revision, commit, cache_dir)
        return ResolvedModel(name, repo_id, snapshot, commit), disk_size(snapshot)


def _failed_checks(snapshot: Path, present: list[str], remote: dict[str, Any], progress: bool) -> list[str]:
    """The files of `present` whose sha256 is not the Hub's, deleted so that they are fetched again."""
    lfs = [f for f in present if remote[f].lfs is not None]
    if lfs and progress:
        _console.print(f"checking {len(lfs)} file(s) from an earlier download", highlight=False, markup=False)
    bad = [f for f in lfs if _sha256(snapshot / f) != remote[f].lfs.sha256]
    remove_files(snapshot, bad)
    return bad


def _weight_names(repo_id: str, remote: set[str], fetch: Callable[[str], Path]) -> list[str]:
    """The weight files to download: the first format of WEIGHT_FILES the repo has, index + shards."""
    weights = next((w for w in WEIGHT_FILES if w in remote), None)
    if weights is None:
        raise CheckpointError(repo_id, "no weights (model.safetensors or pytorch_model.bin)")
    if not weights.endswith(".index.json"):
        return [weights]
    try:
        shards = sorted(set(json.loads(fetch(weights).read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{repo_id}/{weights}", f"bad shard index ({exc})") from None
    absent = [s for s in shards if s not in remote]
    if absent:
        raise CheckpointError(repo_id, f"shards in {weights} missing from the repo: {', '.join(absent)}")
    return [weights, *shards]


def _detail(exc: CheckpointError, snapshot: Path) -> str:
    """A CheckpointError's message with the cache path of the snapshot left out."""
    return str(exc).replace(f"{snapshot}/", "").replace(str(snapshot), "checkpoint")


@contextmanager
def _progress_bar(show: bool) -> Iterator[Callable[[int, str], Callable[[float], None]]]:
    """A rich byte bar on stderr; yields `add(total, label) -> advance(n)`."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=_console, disable=not show) as bar:

        def add(total: int, label: str) -> Callable[[float], None]:
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield add


def _bar_class(advance: Callable[[float], None]) -> type:
    """A tqdm stand-in for huggingface_hub's `tqdm_class` that forwards bytes to one rich task."""

    class Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.total = kwargs.get("total")
            self.n = 0
            self.format_dict: dict[str, Any] = {}

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            advance(n or 0)

        def update_transfer(self, n: float | None = 1) -> None:
            """Network bytes of Xet downloads; `update` already counts the bytes written."""

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            return None

        set_transfer_postfix_str = set_postfix_str

        def refresh(self) -> None:
            return None

        def close(self) -> None:
            return None

    return Bar
