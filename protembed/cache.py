"""Where protembed keeps its own files (FLIP data, feature caches, weight digests)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from protembed.errors import OutputExistsError, StoreError

T = TypeVar("T")


def default_cache_dir() -> Path:
    """`$PROTEMBED_CACHE`, else `$XDG_CACHE_HOME/protembed`, else `~/.cache/protembed`."""
    env = os.environ.get("PROTEMBED_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "protembed"


def user_path(text: str | Path) -> Path | None:
    """`text` as a path with a leading `~` or `~name` expanded; None when `name` is no user here."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return None


def writable(path: Path) -> bool:
    """Whether this process may create and remove files in folder `path`."""
    return os.access(path, os.W_OK | os.X_OK)


def read_only(folder: Path) -> bool:
    """Whether folder `folder` is there and not writable, or missing where it cannot be created."""
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    return nearest.is_dir() and not writable(nearest)


def cache_root(path: Path) -> Path:
    """The cache folder `path`, created if missing. An existing one is used as it is: a shared cache
    someone else filled may be read-only, and is then only read (what it lacks is an error there)."""
    return path if path.is_dir() else ensure_dir(path, "cache folder")


def ensure_dir(path: Path, what: str) -> Path:
    """Create folder `path` (and its parents) if needed and check it is writable.

    `what` names it in the error (e.g. "output folder"): a StoreError with one line, raised before
    any long computation whose results would go there.
    """
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: cannot use as {what}: it is a file, not a folder")
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        raise StoreError(f"{path}: cannot create {what}: it links to {target}, which does not exist")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create {what}: {exc.strerror or exc}") from None
    if not writable(path):
        raise StoreError(f"{path}: cannot write to {what}: permission denied")
    return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def held_lock(path: Path, what: str, wait_s: float = 3600.0) -> Iterator[None]:
    """An exclusive flock on the lock file `path`, created if needed and opened read-only, so that
    one another user of a shared cache created serves too. Another run holding it is waited for,
    with a notice naming `what`; a StoreError after `wait_s`, or on a file system without locks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        verb = "open" if path.exists() else "create"
        raise StoreError(f"{path}: cannot {verb} the lock file of {what}: {exc.strerror or exc}") from None
    try:
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise StoreError(f"cannot lock {what}: {exc.strerror or exc}") from None
                if not waiting:
                    print(f"waiting for another run to release {what}", file=sys.stderr)
                    waiting = True
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file (through links too)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_file_output(path: Path, overwrite: bool = True) -> None:
    """StoreError unless a file can be created at `path` (its folder exists and is writable);
    OutputExistsError if it exists and `overwrite` is off."""
    if path.is_dir():
        raise StoreError(f"{path}: cannot write output: is a folder")
    # A link is written through (see write_whole): the folder that matters is its target's.
    parent = Path(os.path.realpath(path)).parent if path.is_symlink() else path.parent
    if not parent.is_dir():
        why = f"{parent} is not a folder" if parent.exists() else f"folder {parent} does not exist"
        raise StoreError(f"{path}: cannot write output: {why}")
    if not writable(parent) or (path.exists() and not os.access(path, os.W_OK)):
        raise StoreError(f"{path}: cannot write output: permission denied")
    if os.path.lexists(path) and not overwrite:  # a dangling link too: writing would create its target
        raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")


def check_replaceable(path: Path) -> None:
    """StoreError unless `path` is absent or a regular file. An HDF5 output is written beside it and
    renamed over it: a link, a device or a pipe in its place would be swapped for a plain file."""
    try:
        st = path.lstat()
    except OSError:  # absent, or a folder on the way cannot be searched (the write names that)
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        raise StoreError(f"{path}: cannot write output: it is a link to {target}; name the file itself")
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: cannot write output: is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: cannot write output: not a regular file (an HDF5 output replaces it)")


def write_partial(path: Path, fill: Callable[[Path], T]) -> T:
    """`fill(tmp)` writes an HDF5 output's content to `path.partial`, renamed over `path` when it
    returns: the output is whole or not there. A failure removes the partial file; an OSError is a
    StoreError naming `path`. Returns what `fill` returns."""
    tmp = path.with_name(path.name + ".partial")
    try:
        result = fill(tmp)
        os.replace(tmp, path)
        return result
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(f"{path}: cannot write output: {exc.strerror or exc}") from None
        raise


TEMP_PREFIX = ".protembed-"  # temporary files of `write_whole`; one a killed run left is stale


def write_whole(path: Path, fill: Callable[[Path], object]) -> None:
    """`fill(tmp)` writes the file's content to a temporary file beside `path`, which then replaces
    `path` (keeping its permissions): the file is whole or not there. What a replacement would
    change is written in place through `fill(path)` instead: anything but a regular file (a device,
    a pipe, a link: /dev/stdout is all three), a file with other hard links or another owner.
    A failure (full disk, ...) is a StoreError naming `path`."""
    st = path.lstat() if path.is_symlink() or path.exists() else None
    special = st is not None and (
        not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or st.st_uid != os.geteuid()
    )
    tmp = path
    try:
        if not special:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        fill(tmp)
        if tmp != path:  # the mode last: the old file's may be read-only
            os.chmod(tmp, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException as exc:
        if tmp != path:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):  # a closed pipe: 141
            raise StoreError(f"{path}: cannot write output: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
