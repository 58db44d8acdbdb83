"""python -m speed.buckets: the packing table on the sample, the timing and XLA tables' shape."""

from __future__ import annotations

import pytest

from speed import buckets


def rows(out: str, prefix: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith(prefix)]


def test_packing_and_timing_tables(capsys):
    buckets.main(["--lengths", "1024,512", "--counts", "4", "--batches", "12", "--time", "sample", "--reps", "1",
                  "--threads", "1"])  # timed at the last length, 512, where half the sample's micro-batches are whole rows
    out = capsys.readouterr().out
    packing = {r[1]: r for r in rows(out, "| 1024 |")}
    assert list(packing) == ["full rows", "even, n=4", "powers of 2, n=4", "full rows + whole rows",
                             "even, n=4 + whole rows"]
    full, even = packing["full rows"], packing["even, n=4"]
    assert full[5] == "1.00" and full[2] == "1" and full[6] == "0.00"
    # the sample's documents (median 346 residues) need far fewer scores than rows of 1024
    assert float(even[5]) < 0.9 and int(even[2]) > 1
    assert float(full[7]) < float(full[4])  # the documents' bound lies below full rows
    # with whole rows, the crops of long documents come as micro-batches of their own: a second graph
    whole = {r[1]: r for r in rows(out, "| 512 |")}["full rows + whole rows"]
    assert float(whole[6]) > 0 and whole[2] == "2"
    timed = {r[0]: r for r in rows(out, "| full rows") + rows(out, "| length_buckets 4")}
    assert list(timed) == ["full rows", "full rows + whole rows", "length_buckets 4", "length_buckets 4 + whole rows"]
    assert timed["full rows"][4] == "1.00" and all(float(r[3]) > 0 for r in timed.values())
    assert timed["full rows"][2].startswith("0 of") and not timed["full rows + whole rows"][2].startswith("0 of")


def test_bad_lists_end_in_one_sentence():
    with pytest.raises(SystemExit, match="comma lists of integers"):
        buckets.main(["--lengths", "1k"])


@pytest.mark.xla
def test_xla_table_assigns_less_to_shorter_rows(capsys):
    pytest.importorskip("torch_xla")
    buckets.xla_table("sample", 1024, [2])
    table = {(r[0], r[1]): float(r[2]) for r in rows(capsys.readouterr().out, "| ") if r[0][:1].isdigit()}
    assert set(table) == {("4 x 1024", "masked"), ("8 x 512", "masked"), ("4 x 1024", "no mask (whole rows)")}
    assert 0 < table[("8 x 512", "masked")] < table[("4 x 1024", "masked")]
    assert 0 < table[("4 x 1024", "no mask (whole rows)")] <= table[("4 x 1024", "masked")]
