"""bench.py and speed/report.py: what the rows say (columns, same residues for both models, OOM rows, costs) and
what `report` writes. Tiny models at tiny shapes; timings are never asserted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from runtime import hardware
from speed import models, report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model_args", "n_layers=1", "d_model=32", "n_heads=2", "d_ff=64", "--threads", "1",
        "--device", "cpu"]


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_bench(tmp_path, *argv) -> list[dict]:
    threads = torch.get_num_threads()
    try:
        path = bench.main([*TINY, "--out", str(tmp_path), *argv])
    finally:
        torch.set_num_threads(threads)
    return read(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Ours and HF, every mode, two batch sizes, priced at $3.60/h."""
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench(out, "--presets", "esm2_8m", "--batches", "1,2", "--lengths", "64",
                          "--reps", "2", "--realtime_calls", "3", "--usd_per_hour", "3.6")


def test_a_run_writes_every_column_and_sane_numbers(tiny_run):
    out, rows = tiny_run
    with open(out / "run-cpu.csv", newline="") as f:
        assert next(csv.reader(f)) == list(models.COLUMNS)
    shapes = (("train", "1"), ("train", "2"), ("infer", "1"), ("infer", "2"), ("realtime", "1"))
    assert {(r["impl"], r["mode"], r["batch"]) for r in rows} == {
        (impl, mode, b) for impl in ("ours", "hf", "hf_grouped") for mode, b in shapes
        if not (impl == "hf_grouped" and mode == "realtime")}  # batch 1 has no padding to group away
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("residues_per_s", "tokens_per_s", "positions_per_s", "seqs_per_s", "mem_gib"):
            assert float(r[key]) > 0, (key, r)
        assert float(r["residues_per_s"]) <= float(r["tokens_per_s"]) <= float(r["positions_per_s"])
        assert 0 < float(r["ms_p50"]) <= float(r["ms_p99"])
        assert r["mfu"] == ("n/a" if r["mode"] == "train" else "")  # no CPU peak
        assert float(r["load_avg"]) >= 0 and r["device"].startswith("cpu x1 (") and r["dtype"] == "fp32"
    md = (out / "run-cpu.md").read_text()
    assert "| esm2_8m n_layers=1 d_model=32 n_heads=2 d_ff=64 | ours |" in md
    assert "x (" in md  # the ours / HF ratio, wall and CPU time


def test_hf_grouped_sorts_a_megabatch_by_length_and_pads_less():
    wl = models.Workload(512, seed=3)
    step = models.HFGrouped.steps(wl, 4, static=False)
    calls = step.calls
    assert len(calls) >= models.HFGrouped.MEGABATCH and all(b["input_ids"].shape[0] <= 4 for b in calls)
    lengths = [int(n) for b in calls for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)  # longest first, as Trainer's megabatches
    assert all(b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) for b in calls)
    grouped = models._sum_counts(step)
    plain = models._sum_counts(models.HF.steps(models.Workload(512, seed=3), 4, static=False))
    assert grouped["tokens"] / grouped["positions"] > plain["tokens"] / plain["positions"]
    static = models.HFGrouped.steps(models.Workload(512, seed=3), 4, static=True)
    assert {tuple(b["input_ids"].shape) for b in static.calls} == {(4, 512)}


def test_hf_gets_the_same_residues_and_masks_as_ours():
    for static in (False, True):
        ours = models.Ours.steps(models.Workload(1024, seed=3), 4, static)
        hf = models.HF.steps(models.Workload(1024, seed=3), 4, static)
        totals = [models._sum_counts(s) for s in (ours, hf)]
        assert totals[0]["residues"] == totals[1]["residues"] > 0
        assert totals[0]["seqs"] == totals[1]["seqs"] > 4  # several sequences per packed row
        assert ours.t_eff == hf.t_eff

        def masked(step):
            return sorted(torch.cat([b["labels"][b["labels"] != -100] for b in step.calls]).tolist())

        assert masked(ours) == masked(hf) and masked(ours)
        assert ours.calls[0]["input_ids"].shape == (4, 1024)
        assert all(b["input_ids"].shape[0] <= 4 for b in hf.calls)
        if static:  # one shape for every call on devices that compile per shape
            assert {tuple(b["input_ids"].shape) for b in hf.calls} == {(4, 1024)}
        else:
            assert totals[1]["positions"] < len(hf.calls) * 4 * 1024  # padded to the longest only


def test_an_oom_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch):
    real = models.train_step

    def flaky(backend, impl, model, optimizer, step):
        rows = step.calls[0]["input_ids"].shape[0]
        if rows == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if rows == 3:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating")
        if rows == 4:
            raise ValueError("something else\nsecond line")
        return real(backend, impl, model, optimizer, step)

    monkeypatch.setattr(models, "train_step", flaky)
    rows = run_bench(tmp_path, "--presets", "esm2_8m", "--batches", "1,2,3,4,5", "--lengths", "32",
                     "--modes", "train", "--reps", "1", "--no-hf")
    assert [r["status"] for r in rows] == ["ok", "oom", "oom", "error: ValueError: something else", "ok"]
    assert rows[1]["residues_per_s"] == "" and rows[1]["usd_per_1m_tokens"] == ""
    md = models.markdown(rows)
    assert "| 2 x 32 | OOM |" in md


def test_compiled_rows_ran_compiled_and_rows_that_ran_eagerly_say_so(tmp_path, monkeypatch):
    """--compile true over three presets. Dynamo keeps compiled code per code object, not per
    model: without a reset between models the later ones pass its recompile limit and run
    eagerly. The limit is scaled down to this run (one forward shape per model) instead of
    measuring eight models; a compiled row also compiled nothing in its timed repeats."""
    argv = ("--model_args", "n_layers=1",  # replaces TINY's: each preset keeps its own width
            "--presets", "esm2_8m,esm2_35m,esm2_150m", "--compile", "true", "--no-hf",
            "--modes", "infer", "--batches", "1", "--lengths", "16", "--reps", "2")
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            rows = run_bench(tmp_path / "reset", *argv)
            assert [(r["compiled"], r["compiles"], r["status"]) for r in rows] == [("True", "0", "ok")] * 3
            # Without the reset the second and third models run eagerly, and their rows say so.
            torch._dynamo.reset()
            with monkeypatch.context() as m:
                m.setattr(torch._dynamo, "reset", lambda: None)
                rows = run_bench(tmp_path / "no-reset", *argv)
            assert [(r["compiled"], r["status"]) for r in rows] == [("True", "ok"), ("False", "ok"), ("False", "ok")]
    finally:
        torch._dynamo.reset()


def test_costs_follow_the_price(tiny_run, tmp_path):
    _, rows = tiny_run
    for r in rows:
        assert r["usd_per_hour"] == "3.6" and r["price_date"] == "given"
        key, rate = (("usd_per_1m_tokens", "tokens_per_s") if r["mode"] == "train"
                     else ("usd_per_1m_inferences", "seqs_per_s"))
        assert float(r[key]) == pytest.approx(hardware.usd_per_million(float(r[rate]), 3.6), rel=1e-4)
    # No price for a CPU in the table and none given: n/a. A priced instance: its per-accelerator rate.
    rows = run_bench(tmp_path, "--presets", "speedrun", "--batches", "1", "--lengths", "32",
                     "--modes", "train,realtime", "--reps", "1", "--realtime_calls", "1")
    assert [(r["usd_per_1m_tokens"], r["usd_per_1m_inferences"]) for r in rows] == [("n/a", ""), ("", "n/a")]
    args = bench.parse_args(["--instance", "trn1.2xlarge"])
    pr = models.price(None, args)
    assert pr["usd_per_hour"] == pytest.approx(1.34375 / 2) and pr["price_date"] == "2026-05-20"
    with pytest.raises(SystemExit, match="not in the price table"):
        models.price(None, bench.parse_args(["--instance", "p9.huge"]))


def _row(**kw) -> dict:
    base = dict(date="2026-11-22", machine="box", device="cpu x1", accelerator="CPU", torch="2.13",
                preset="esm2_8m", impl="ours", params=7_500_000, dtype="fp32", attn="sdpa",
                compiled=False, reps=3, status="ok", residues_per_s=1000.0, tokens_per_s=1010.0,
                positions_per_s=1100.0, seqs_per_s=3.0, residues_per_cpu_s=900.0, padding=0.05,
                seqs_per_call=3.0, mfu="n/a", mem_gib=0.5, ms_p50=10.0, ms_p99=12.0, compiles=None,
                instance="", usd_per_hour=None, price_date="", usd_per_1m_tokens="n/a",
                usd_per_1m_inferences="n/a", load_avg=2.0)
    return models.csv_row({**base, **kw})


def test_report_writes_tables_plots_and_only_the_marked_section(tmp_path):
    rows = []
    for impl, speed in (("ours", 2.0), ("hf", 1.0)):
        for mode in ("train", "infer"):
            for L in (64, 128):
                for B in (1, 2, 4):
                    cells = dict(impl=impl, mode=mode, batch=B, seq_len=L,
                                 residues_per_s=speed * B * 100, mem_gib=0.1 * B)
                    if impl == "hf" and B == 4 and L == 128:
                        cells.update(status="oom", residues_per_s=None)
                    rows.append(_row(**cells))
        rows.append(_row(impl=impl, mode="realtime", batch=1, seq_len=128, ms_p50=5 / speed))
    models.write_csv(tmp_path / "sweep-cpu.csv", rows[:10], append=True)
    models.write_csv(tmp_path / "sweep-cpu.csv", rows[10:], append=True)  # appended: one header
    assert sum(1 for line in open(tmp_path / "sweep-cpu.csv") if line.startswith("date,")) == 1
    md = tmp_path / "BENCHMARKS.md"
    before, after = "# Benchmarks\n\nhand-written text\n\n", "\n\n## Later section\nkept\n"
    md.write_text(f"{before}{report.MARK_START}\nold generated text\n{report.MARK_END}{after}")
    argv = ["report", "--inputs", str(tmp_path / "sweep-cpu.csv"), "--plots", str(tmp_path / "plots"),
            "--benchmarks", str(md)]
    text = bench.main(argv)
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["infer_vs_batch.png", "infer_vs_seq_len.png",
                                      "train_vs_batch.png", "train_vs_seq_len.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "| esm2_8m | ours | 7.5M | 2 x 64 | 400 |" in text
    assert "| esm2_8m | hf | 7.5M | 4 x 128 | OOM |" in text
    assert "2.00x (1.00x CPU)" in text  # ours / HF in one row
    new = md.read_text()
    assert new.startswith(before + report.MARK_START) and new.endswith(report.MARK_END + after)
    assert "old generated text" not in new and "(plots/train_vs_batch.png)" in new
    bench.main(argv)
    assert md.read_text() == new  # rewriting is idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("# Mine\n")
    bench.main(argv[:3] + ["--plots", "", "--benchmarks", str(plain)])
    assert plain.read_text().startswith("# Mine\n\n" + report.MARK_START)


def test_report_without_csv_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run `python bench.py`"):
        bench.main(["report", "--out", str(tmp_path), "--benchmarks", ""])


@pytest.mark.xla
def test_xla_cpu_runtime_run(tmp_path):
    """`--device xla` on torch-xla's CPU runtime: every mode measured, nothing compiled after
    warm-up (the timed repeats reuse the warm-up's graphs)."""
    pytest.importorskip("torch_xla")
    env = dict(os.environ, PJRT_DEVICE="CPU",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, "bench.py", "--device", "xla", "--dtype", "fp32", "--presets", "esm2_8m",
           "--model_args", "n_layers=1", "d_model=32", "n_heads=2", "d_ff=64", "--batches", "2",
           "--lengths", "32", "--reps", "2", "--realtime_calls", "2", "--no-hf", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300)
    rows = read(tmp_path / "run-xla-cpu.csv")
    assert [r["mode"] for r in rows] == ["train", "infer", "realtime"]
    for r in rows:
        assert r["status"] == "ok" and r["device"].startswith("xla x1 (CPU")
        assert float(r["residues_per_s"]) > 0 and r["compiles"] == "0"
