"""One writer per output file: an exclusive lock beside it, which names the run holding it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from protembed.errors import OutputExistsError, StoreError


class OutputLock:
    """An exclusive flock on `OUTPUT.lock`, which holds the pid; removed on release. One that another
    user's killed run left is taken over."""

    def __init__(self, output: Path) -> None:
        target = output.resolve()  # one lock per file, whichever symlink names it
        self.path, self.fd = target.with_name(target.name + ".lock"), -1
        if output.is_dir():
            raise StoreError(f"{output}: cannot write output: is a folder")
        try:
            while True:
                try:
                    fd, ours = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), True
                except PermissionError:  # another user's lock file: held now, or left by a killed run
                    if not self.path.exists():
                        raise
                    fd, ours = os.open(self.path, os.O_RDONLY), False
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise OutputExistsError(
                        f"{output}: another protembed run (pid {holder}) is writing this output; "
                        f"wait for it to finish or stop it"
                    ) from None
                # A run that just finished may have unlinked the file we locked: lock the new one.
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    if ours:
                        break
                    try:  # left by a killed run (we hold it): replaced by one of ours
                        self.path.unlink()
                    except OSError:  # not ours to remove (a sticky folder): held as it is
                        break
                os.close(fd)
            if ours:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            lock_file = exc.filename is not None and self.path.exists()  # it is in the way, not the folder
            where = f"lock file {self.path}: " if lock_file else ""
            raise StoreError(f"{output}: cannot write output: {where}{exc.strerror or exc}") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):  # (another user's, in a sticky folder: it stays)
                self.path.unlink(missing_ok=True)  # while still locked, so no one locks a stale file
            os.close(self.fd)
            self.fd = -1
