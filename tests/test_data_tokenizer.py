import numpy as np
import pytest

from data.tokenizer import (
    AA_IDS,
    CLS,
    EOS,
    MASK,
    PAD,
    UNK,
    VOCAB,
    VOCAB_SIZE,
    decode,
    encode,
    encode_with_unknowns,
)


def test_ids_are_esm2():
    assert (CLS, PAD, EOS, UNK, MASK, VOCAB_SIZE) == (0, 1, 2, 3, 32, 33)
    assert "".join(VOCAB[i] for i in AA_IDS) == "LAGVSERTIDPKQNFYMHWC"
    assert list(encode("LACO.-")) == [4, 5, 23, 28, 29, 30]


def test_round_trip_random_sequences():
    rng = np.random.default_rng(0)
    letters = np.array(list("LAGVSERTIDPKQNFYMHWCXBUZO"))
    for n in (0, 1, 7, 1000):
        seq = "".join(rng.choice(letters, n))
        ids = encode(seq)
        assert ids.dtype == np.uint8 and len(ids) == n
        assert decode(ids) == seq
        assert encode(seq.encode()).tolist() == ids.tolist()


def test_lower_case_and_unknowns_are_counted():
    ids, n_unknown = encode_with_unknowns("mkVJ*é")
    assert ids[:3].tolist() == encode("MKV").tolist()
    assert ids[3:].tolist() == [UNK] * 4  # J, *, and the two UTF-8 bytes of é
    assert n_unknown == 4


def test_matches_hugging_face_esm_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    hf = transformers.EsmTokenizer(vocab_file=str(vocab))
    seq = "MKVLAAGICWYHXBUZO"
    assert hf(seq)["input_ids"] == [CLS, *encode(seq).tolist(), EOS]
    assert hf.mask_token_id == MASK and hf.pad_token_id == PAD
