"""The FLIP FASTA server: pinned files, a checked download into the cache.

Files live at `<FLIP_URL>/<folder>/<file>.fasta`. Each downloadable file is pinned by the sha256 of
its content (where we hold a copy to hash) and by its record counts; a download that does not
match, or that ends inside a record, is deleted and reported, never used.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protembed.cache import ensure_dir, file_sha256, held_lock, read_only
from protembed.errors import HubError

FLIP_URL = "http://data.bioembeddings.com/public/FLIP/fasta/"

Progress = Callable[[str, int, "int | None"], None]  # (file, bytes done, bytes total)


@dataclass(frozen=True)
class Pin:
    """What a file from the FLIP server must be: sha256 of the uncompressed file (when we have a
    copy to hash) and its record counts, (train, validation, test) or (records,)."""

    sha256: str | None
    counts: tuple[int, ...]


# sha256 values are of the gunzipped files in shared/data/flip/fasta_layout; meltome and scl could
# not be obtained, so those two are pinned only by the record counts the FLIP READMEs publish.
PINS: dict[str, Pin] = {
    "gb1/one_vs_rest": Pin(
        "3af259abd9cafd843d264d41fc17c46542392b26cd063eb5a6cdd4f3d9a68188", (25, 3, 8705)),
    "gb1/two_vs_rest": Pin(
        "c36a5694467b322060f0a766e3cb40ebb8a727a39d41ddd104a814f833b327e1", (381, 43, 8309)),
    "gb1/three_vs_rest": Pin(
        "276a9d37342b3ffa50c5f5ee1e11f45975d179b784806e6dea8076c8a498a0ec", (2691, 299, 5743)),
    "gb1/low_vs_high": Pin(
        "15dc7b8090cf1e4963e4a6bdfb1c531c9b9894eeef33221981fb1d5c67408516", (4580, 509, 3644)),
    "gb1/sampled": Pin(
        "2259bafa03b87134502a77c47107210d41ca07e5dae3b4a1374ac0e3f81f6090", (6289, 699, 1745)),
    "secondary_structure/sequences": Pin(
        "ad3d62d1a3fcd44cb59b3eff2c8f7ffdbf68ad5ba540fc7e0ee6851377e436ae", (11440,)),
    "secondary_structure/sampled": Pin(
        "4c98e70930134df6458142ccda36ef8a3a32623f580861c03f0c48f8e252242a", (9712, 1080, 648)),
    "secondary_structure/resolved": Pin(
        "5aad80ab3e045c589f6ee740b321519b8e5fcdccb9642c3422e1ec383eecdb7d", (11440,)),
    "conservation/sequences": Pin(
        "efc86819cd06167e5c34e7f6377d90f30a1636121e588a115f53a9ad4bf39a64", (10507,)),
    "conservation/sampled": Pin(
        "fe7621ff1c49e6e0f20ca974f27749c4f88c34f33a978c45847fe801cf5af59d", (9392, 555, 519)),
    "bind/sequences": Pin(
        "09487b43f207164acef3c491bf59e9ba83f3fcc2d19f011f2bab1ddfc0b9d924", (1360,)),
    "bind/from_publication": Pin(
        "8b000abee7f98633cdf3683aa9ef9311ddddd41c1be9845992c2af5f8a550e4d", (954, 106, 300)),
    "bind/one_vs_many": Pin(
        "00c885369dcb92f2c9cee4a645ed4b8a23a135cf9a05ef5760916592133a3226", (996, 114, 250)),
    "bind/two_vs_many": Pin(
        "9002f9c5735d772a35b97cca8756194fc04446297dfd56ec5e3241a7db2bd235", (1201, 140, 19)),
    "bind/one_vs_sm": Pin(
        "a6716a11fcf5ba3431dacf0a8b7ead2a7a27b31ea0e75ffde2a38e35f896140c", (999, 111, 134)),
    "bind/one_vs_mn": Pin(
        "bfb89809e662e7fcff2d3861da8668be4174bfbe55dc8e80645fa41bb04a2ed1", (254, 31, 32)),
    "bind/one_vs_sn": Pin(
        "0a11de0c900bfeea3e9f58ffc88d48f92ba9c44eada85df5e769324d753d8f5c", (254, 31, 53)),
    "meltome/mixed_split": Pin(None, (22335, 2482, 3134)),
    "scl/mixed_soft": Pin(None, (9503, 1158, 2768)),
}  # fmt: skip


def fetch(
    folder: str, name: str, cache_dir: Path, base_url: str = FLIP_URL, progress: Progress | None = None
) -> Path:
    """A pinned FLIP file from the cache, downloading and checking it first if needed.

    A cached file is checked again on every use (a few MB to hash) and fetched again if it fails;
    runs that need the same file at once take turns (a lock beside it), so one downloads it.
    """
    key = f"{folder}/{name}"
    if key not in PINS:
        raise HubError(f"{key}.fasta is not a pinned FLIP file; download it yourself and pass --data-dir")
    dest = cache_dir / "flip" / folder / f"{name}.fasta"
    if read_only(dest.parent):  # a shared cache, filled by someone else
        if not dest.is_file():
            raise HubError(f"{dest}: not in the read-only cache; pass a --cache-dir you can write to")
        check_pin(dest, PINS[key], _sha256(dest), f"{dest} (in a read-only cache)")
        return dest
    ensure_dir(dest.parent, "cache folder")
    url = f"{base_url.rstrip('/')}/{key}.fasta"
    with held_lock(dest.with_name(f".{dest.name}.lock"), f"the FLIP file {dest}"):
        if dest.is_file():
            digest = _sha256(dest)  # (a file this user cannot read is an error, not damage)
            try:
                check_pin(dest, PINS[key], digest, str(dest), length_known=True)
                return dest
            except HubError:  # damaged since it was checked: fetched again below
                _unlink(dest, "a damaged cached file")
        part = dest.with_suffix(".fasta.part")
        _unlink(part, "an interrupted download")  # (we hold the lock: no one is writing it)
        try:
            sha256, length_known = _download(url, part, key, progress)
            check_pin(part, PINS[key], sha256, url, length_known)
        except BaseException:  # a failed check, a lost connection, Ctrl-C: nothing half-written stays
            part.unlink(missing_ok=True)
            raise
        part.replace(dest)
    return dest


def _sha256(path: Path) -> str:
    """The digest of a cached file; a HubError naming it when it cannot be read (not damage: the
    file may be another user's, who did not share it)."""
    try:
        return file_sha256(path)
    except OSError as exc:
        raise HubError(f"{path}: cannot read the cached file: {exc.strerror or exc}") from None


def _unlink(path: Path, what: str) -> None:
    """Remove `what` from the cache; a HubError naming it when that is not allowed."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise HubError(
            f"{path}: {what} that cannot be removed ({exc.strerror or exc}); delete it (or ask its "
            "owner to), or pass another --cache-dir"
        ) from None


def _download(url: str, part: Path, key: str, progress: Progress | None) -> tuple[str, bool]:
    """`url` into `part`: (sha256, whether the server gave the length that the transfer matched)."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            done = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(key, done, total)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise HubError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
    if total is not None and done < total:
        raise HubError(f"cannot download {url}: the transfer stopped after {done} of {total} bytes")
    return digest.hexdigest(), total is not None


def check_pin(path: Path, pin: Pin, sha256: str, url: str, length_known: bool = True) -> None:
    """HubError unless a downloaded file has the pinned checksum, record counts and whole records.

    `length_known`: the server gave the file's length and the transfer matched it. Without it only
    a final line break shows that the end arrived (for files pinned by counts alone).
    """
    if pin.sha256 is not None and sha256 != pin.sha256:
        raise HubError(f"{url}: sha256 {sha256[:12]}... does not match the pinned {pin.sha256[:12]}...")
    counts, whole = record_counts(path)
    got = counts[:3] if len(pin.counts) == 3 else counts[3:]
    if got != pin.counts:
        raise HubError(f"{url}: record counts {got} do not match the pinned {pin.counts}")
    if whole is False or (whole is None and not length_known):
        raise HubError(f"{url}: the file ends inside a record (the transfer was cut short)")


def record_counts(path: Path) -> tuple[tuple[int, int, int, int], bool | None]:
    """(train, validation, test, all) header counts from the SET= and VALIDATION= annotations, and
    whether the file ends with a whole record: False when its last line is a header, None when it
    does not end with a line break.

    A quick check of a download, not validation: the task readers parse every record later.
    """
    counts, last = [0, 0, 0, 0], b""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                last = line
            if line.startswith(b">"):
                fields = line.split()
                test, val = b"SET=test" in fields, b"VALIDATION=True" in fields
                counts[2 if test else 1 if val else 0] += 1
                counts[3] += 1
    whole = False if last.startswith(b">") else None if last and not last.endswith(b"\n") else True
    return (counts[0], counts[1], counts[2], counts[3]), whole
