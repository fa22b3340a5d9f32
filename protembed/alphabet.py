"""Vocabularies of ESM-2 and AMPLIFY and a vectorised encoder for protein sequences.

Residues are upper-cased before encoding (case carries no meaning in protein FASTA) and a
trailing ``*`` (stop) is dropped. Letters outside a model's vocabulary become ``<unk>``, one per
letter (ESM-2 has tokens for X U B Z O; AMPLIFY has B only). The literal text ``<mask>`` becomes
the mask token. Any other character is an `InvalidSequenceError` naming its 1-based position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protembed.errors import InvalidSequenceError

ESM2_TOKENS = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)  # fmt: skip
AMPLIFY_TOKENS = (
    "<pad>", "<unk>", "<mask>", "<bos>", "<eos>", "|",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C", "B",
)  # fmt: skip

MASK_TEXT = "<mask>"
_INVALID = -1


@dataclass(frozen=True)
class Alphabet:
    """A model vocabulary: token strings in id order plus the ids of the special tokens."""

    tokens: tuple[str, ...]
    bos: int
    eos: int
    pad: int
    unk: int
    mask: int
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # byte -> token id; letters without a token map to <unk>; everything else is invalid.
        table = np.full(256, _INVALID, dtype=np.int64)
        for c in range(ord("A"), ord("Z") + 1):
            table[c] = self.unk
        for i, tok in enumerate(self.tokens):
            if len(tok) == 1 and tok.isalpha():
                table[ord(tok)] = i
        lower = np.arange(ord("a"), ord("z") + 1)
        table[lower] = table[lower - 32]
        object.__setattr__(self, "_table", table)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def encode(self, seq: str, record: str | None = None) -> np.ndarray:
        """Token ids of one sequence framed as BOS + residues + EOS (int64, length len+2)."""
        body = self.residue_ids(seq, record)
        out = np.empty(body.size + 2, dtype=np.int64)
        out[0], out[-1] = self.bos, self.eos
        out[1:-1] = body
        return out

    def residue_ids(self, seq: str, record: str | None = None) -> np.ndarray:
        """Token ids of the residues only, without BOS/EOS."""
        if seq.endswith("*"):
            seq = seq[:-1]
        if MASK_TEXT in seq.lower():
            return self._with_masks(seq, record)
        return self._lookup(seq, 0, record)

    def _lookup(self, seq: str, offset: int, record: str | None) -> np.ndarray:
        raw = np.frombuffer(seq.encode("latin-1", errors="replace"), dtype=np.uint8)
        ids = self._table[raw]
        bad = np.flatnonzero(ids == _INVALID)
        if bad.size:
            pos = int(bad[0])
            raise InvalidSequenceError(seq[pos], offset + pos + 1, record)
        return ids

    def _with_masks(self, seq: str, record: str | None) -> np.ndarray:
        parts, offset = [], 0
        lowered = seq.lower()
        start = 0
        while True:
            hit = lowered.find(MASK_TEXT, start)
            chunk = seq[start:] if hit < 0 else seq[start:hit]
            parts.append(self._lookup(chunk, offset, record))
            offset += len(chunk)
            if hit < 0:
                break
            parts.append(np.array([self.mask], dtype=np.int64))
            offset += len(MASK_TEXT)
            start = hit + len(MASK_TEXT)
        return np.concatenate(parts)

    def validate(self, seq: str, record: str | None = None) -> int:
        """Check a sequence and return its number of residue tokens."""
        return int(self.residue_ids(seq, record).size)


ESM2 = Alphabet(ESM2_TOKENS, bos=0, eos=2, pad=1, unk=3, mask=32)
AMPLIFY = Alphabet(AMPLIFY_TOKENS, bos=3, eos=4, pad=0, unk=1, mask=2)

ALPHABETS = {"esm2": ESM2, "amplify": AMPLIFY}
