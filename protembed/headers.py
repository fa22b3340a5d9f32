"""Header texts of many FASTA records, kept compact for inputs of tens of millions of records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np


class Headers(Sequence[str]):
    """Header texts of many records, kept compact: one UTF-8 blob and the offsets into it (the
    text plus 8 bytes per record; a Python string costs about 50 bytes more, and every record had
    two). With `first_word`, each item is the record's id instead of its whole header. A slice is
    a view on the same blob."""

    def __init__(self, blob: bytes | bytearray, offsets: np.ndarray, first_word: bool = False) -> None:
        self.blob, self.offsets, self.first_word = blob, offsets, first_word

    @staticmethod
    def append(blob: bytearray, texts: list[str]) -> np.ndarray:
        """Add a batch of headers to `blob` (grown in place, never copied whole); their byte sizes."""
        encoded = [t.encode() for t in texts]
        blob += b"".join(encoded)
        return np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))

    @classmethod
    def build(cls, blob: bytearray, sizes: list[np.ndarray]) -> Headers:
        """From a blob filled by `append` and the sizes it returned, in order."""
        return cls(blob, np.cumsum(np.concatenate([np.zeros(1, dtype=np.int64), *sizes])))

    def ids(self) -> Headers:
        """The same records' ids (first word of each header)."""
        return Headers(self.blob, self.offsets, first_word=True)

    def __len__(self) -> int:
        return int(self.offsets.size) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Headers: ...
    def __getitem__(self, i: int | slice) -> str | Headers:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("Headers: slices with a step are not supported")
            return Headers(self.blob, self.offsets[start : max(start, stop) + 1], self.first_word)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} records")
        i %= n
        return self._texts(i, i + 1)[0]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 1 << 16):
            yield from self._texts(start, min(start + (1 << 16), len(self)))

    def _texts(self, start: int, stop: int) -> list[str]:
        """Items start..stop-1, decoded together."""
        ends = self.offsets[start : stop + 1]
        chunk = self.blob[ends[0] : ends[-1]]
        bounds = (ends - ends[0]).tolist()
        if chunk.isascii():  # one character per byte: cut the decoded text at the byte offsets
            text = chunk.decode()
            texts = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        else:
            texts = [chunk[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [(t.split(None, 1) or [""])[0] for t in texts] if self.first_word else texts
