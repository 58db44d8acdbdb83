"""The ESM2 vocabulary (33 tokens, ids exactly as ESM-1b/ESM2 and Hugging Face EsmTokenizer).

Encoding is one numpy lookup through a 256-entry byte table, never a Python loop per residue.
"""

from __future__ import annotations

import numpy as np

CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
SPECIAL = ("<cls>", "<pad>", "<eos>", "<unk>")
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO.-"
VOCAB = (*SPECIAL, *RESIDUES, "<null_1>", "<mask>")
VOCAB_SIZE = len(VOCAB)
AA_LOW, AA_HIGH = 4, 24  # the 20 standard amino acids are ids [AA_LOW, AA_HIGH)
AA_IDS = tuple(range(AA_LOW, AA_HIGH))
FIRST_RESIDUE_ID = 4  # ids below this are <cls> <pad> <eos> <unk>
IGNORE = -100  # label of positions without loss (PyTorch cross_entropy's ignore_index)

assert VOCAB_SIZE == 33 and VOCAB[MASK] == "<mask>" and VOCAB[AA_HIGH - 1] == "C"


def _build_table() -> np.ndarray:
    table = np.full(256, UNK, dtype=np.uint8)
    for i, ch in enumerate(RESIDUES, start=FIRST_RESIDUE_ID):
        table[ord(ch)] = i
        table[ord(ch.lower())] = i  # lower-case residues are upper-cased
    return table


_TABLE = _build_table()


def _as_bytes(seq: str | bytes) -> np.ndarray:
    if isinstance(seq, str):
        # Non-ASCII characters cannot be residues; each of their UTF-8 bytes becomes <unk>.
        seq = seq.encode("utf-8")
    return np.frombuffer(seq, dtype=np.uint8)


def encode(seq: str | bytes) -> np.ndarray:
    """Residue ids (uint8) of one sequence, without <cls>/<eos>; unknown characters -> <unk>."""
    return _TABLE[_as_bytes(seq)]


def encode_with_unknowns(seq: str | bytes) -> tuple[np.ndarray, int]:
    """Like `encode`, also returning how many characters became <unk>."""
    ids = encode(seq)
    return ids, int(np.count_nonzero(ids == UNK))


def decode(ids) -> str:
    """Ids back to text; special tokens are written as <cls>, <eos>, <mask>, ..."""
    return "".join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1))
