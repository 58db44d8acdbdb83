"""python -m speed.buckets: the packing table on the sample, the timing and XLA tables' shape."""

from __future__ import annotations

import pytest

from speed import buckets


def rows(out: str, prefix: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith(prefix)]


def test_packing_and_timing_tables(capsys):
    buckets.main(["--lengths", "1024", "--counts", "4", "--batches", "6", "--time", "sample", "--reps", "1",
                  "--threads", "1"])
    out = capsys.readouterr().out
    packing = rows(out, "| 1024 |")
    assert [r[1] for r in packing] == ["full rows", "even, n=4", "powers of 2, n=4"]
    full, even = packing[0], packing[1]
    assert full[5] == "1.00" and full[2] == "1"
    # the sample's documents (median 346 residues) need far fewer scores than rows of 1024
    assert float(even[5]) < 0.9 and int(even[2]) > 1
    assert float(full[6]) < float(full[4])  # the documents' bound lies below full rows
    timed = rows(out, "| full rows |") + rows(out, "| length_buckets 4 |")
    assert len(timed) == 2 and timed[0][3] == "1.00" and float(timed[1][2]) > 0


def test_bad_lists_end_in_one_sentence():
    with pytest.raises(SystemExit, match="comma lists of integers"):
        buckets.main(["--lengths", "1k"])


@pytest.mark.xla
def test_xla_table_assigns_less_to_shorter_rows(capsys):
    pytest.importorskip("torch_xla")
    buckets.xla_table("sample", 1024, [2])
    table = {r[0]: float(r[1]) for r in rows(capsys.readouterr().out, "| ") if "x" in r[0] and r[0][0].isdigit()}
    assert set(table) == {"4 x 1024", "8 x 512"}
    assert 0 < table["8 x 512"] < table["4 x 1024"]
