"""data.overlap: the share of held-out residues whose +-k context occurs in train, and the lookup loss."""

import math

from data.overlap import SMOOTH, contexts, main, overlap
from data.shards import join_documents, write_shard
from data.tokenizer import encode

COPY = "MKTAYIAKQRQISFVKSHFSRQ"


def shard(seqs):
    return join_documents([encode(s) for s in seqs])


def test_contexts_stay_inside_documents():
    tokens = shard(["MKV", "AC"])  # <cls>MKV<eos> <cls>AC<eos>
    keys, residues, pos = contexts(tokens, 1)
    # every window of one inside a document: 3 + 2 centres, none across the <eos><cls> seam
    assert residues.tolist() == list(encode("MKV")) + list(encode("AC"))
    assert len(set(keys.tolist())) == 5 and pos.tolist() == [1, 2, 3, 6, 7]


def test_a_copied_protein_is_seen_and_predicted_and_a_new_one_is_not():
    fresh = "WWPWWCWWCCPCWWPPW" * 2  # residues and contexts the train split never has
    train = shard([COPY, "MKVLAAGGDE" * 6])
    share, nll, n = overlap(train, shard([COPY, fresh]), 2)
    # the copy's residues whose +-2 window fits its document (<cls>/<eos> count): 24 - 2 * 2
    within = len(COPY) + 2 - 2 * 2
    assert n == within and math.isclose(share, within / (within + len(fresh) + 2 - 4))
    assert math.isclose(nll, -math.log((1 + SMOOTH) / (1 + 20 * SMOOTH)), rel_tol=1e-9)
    for held in (shard([fresh]), shard(["MK"])):  # nothing shared; a document shorter than the window
        share, nll, n = overlap(train, held, 2 if len(held) > 4 else 3)
        assert (share, n) == (0.0, 0) and math.isnan(nll)


def test_cli_prints_a_row_per_order(tmp_path, capsys):
    write_shard(tmp_path / "toy_train_000000.bin", shard([COPY, "MKVLAAGG" * 3]))
    write_shard(tmp_path / "toy_valid_000000.bin", shard([COPY]))
    assert main(["--data", str(tmp_path), "--orders", "2,4"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 1.0000 |" in out and "| 4 | 1.0000 |" in out
    assert main(["--data", str(tmp_path), "--orders", "0"]) == 2
    assert main(["--data", str(tmp_path), "--split", "test"]) == 2
    assert "needs train and test shards" in capsys.readouterr().err
