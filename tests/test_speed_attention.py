"""python -m speed.attention: one row per implementation and shape, ratios against the first."""

from __future__ import annotations

import pytest

from speed import attention


def ratio_fits_printed_times(num: float, den: float, ratio: float) -> bool:
    """A ratio of unrounded medians against the two times printed to 0.1 ms (each up to 0.05 ms
    off), itself printed to 0.01."""
    return num > 0 and (num - 0.05) / (den + 0.05) - 0.005 <= ratio <= (num + 0.05) / max(den - 0.05, 1e-3) + 0.005


def test_prints_one_row_per_implementation_with_ratios(capsys):
    attention.main(["--presets", "sample", "--shapes", "2x64", "--reps", "1", "--threads", "1",
                    "--impls", "sdpa,varlen,nomask"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| sample")]
    assert [r[3].strip() for r in rows] == ["sdpa", "varlen", "nomask"]
    first, second, _ = ([c.strip() for c in r] for r in rows)
    assert first[5] == "1.00" and first[7] == "1.00"  # the first implementation is the unit
    assert ratio_fits_printed_times(float(second[4]), float(first[4]), float(second[5])), (first, second)
    assert 0 < float(first[2]) <= 1  # the share of the dense scores the documents need


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "4by1024"], "BxL items such as 4x1024"),
    (["--impls", "flex"], "comma list of sdpa, varlen, reference"),
])
def test_bad_options_end_in_one_sentence(argv, message):
    with pytest.raises(SystemExit, match=message):
        attention.main(argv)


def test_the_dtype_table_has_a_row_per_head_dim_and_length(capsys):
    from speed import attention_dtype

    attention_dtype.main(["--head_dims", "16,64", "--lengths", "32", "--width", "64", "--reps", "1", "--threads", "1"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line[:3] in ("| 1", "| 6")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("16", "4", "32"), ("64", "1", "32")]
    for r in rows:
        bf16, fp32, ratio = float(r[3]), float(r[4]), float(r[5])
        assert bf16 > 0 and ratio_fits_printed_times(fp32, bf16, ratio), r
    with pytest.raises(SystemExit, match="comma list of integers"):
        attention_dtype.main(["--head_dims", "sixteen"])


def test_the_dtype_table_adds_the_math_backend_when_asked(capsys):
    from speed import attention_dtype

    attention_dtype.main(["--head_dims", "16", "--lengths", "32", "--width", "32", "--reps", "1", "--threads", "1",
                          "--math"])
    lines = capsys.readouterr().out.splitlines()
    header = [line for line in lines if line.startswith("| head dim")][0]
    assert header.endswith("| bf16 math ms | float32 math ms |")
    row = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| 16")][0]
    assert len(row) == 8 and all(float(x) > 0 for x in row[6:]), row
