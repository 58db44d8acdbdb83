"""leaderboard.py: verify accepts real run logs of tiny train.py runs (straight and resumed) and
rejects each kind of tampering with a message naming it; render ranks, rejects and plots; plot
draws any runs."""

import dataclasses
import hashlib
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from train_support import ROOT, run_train, write_tiny_shards

import leaderboard
from submissions import board
from submissions.logcheck import Rejected, verify
from submissions.logparse import BAR, parse_text
from submissions.tracks import TRACKS, Track

RUN = ("--num_steps", "12", "--eval_every", "6", "--log_every", "3")  # batch_size 512 (TINY)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real logs: `good` (12 steps straight) and `resumed` (6 steps, then --resume auto to 12)."""
    tmp = tmp_path_factory.mktemp("leaderboard")
    data = write_tiny_shards(tmp / "data")
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_train, tmp, data, "good", *RUN),
                pool.submit(run_train, tmp, data, "resumed", *RUN, "--steps_this_run", "6")]
        for job in jobs:
            job.result()
    run_train(tmp, data, "resumed", *RUN, "--resume", "auto")
    return tmp / "logs", data


def read(path) -> str:
    return path.read_bytes().decode("utf-8")  # no newline translation: embedded sources stay exact


def copy(runs, dst, name="good", edit=None, jsonl=False, as_name=None):
    """A copy of a real log in `dst`, its text passed through `edit`, with or without the .jsonl."""
    logs, _ = runs
    text = read(logs / f"{name}.txt")
    new = edit(text) if edit else text
    assert new != text or edit is None, "the edit changed nothing"
    out = dst / f"{as_name or name}.txt"
    out.write_bytes(new.encode("utf-8"))
    if jsonl:
        shutil.copy(logs / f"{name}.jsonl", out.with_suffix(".jsonl"))
    return out


def set_field(line_start: str, key: str, value: str):
    """An edit: in the first line starting with `line_start`, set `key:` to `value`."""
    def edit(text):
        rows = text.split("\n")
        i = next(i for i, r in enumerate(rows) if r.startswith(line_start))
        rows[i] = re.sub(rf"(^| ){re.escape(key)}:\S*", rf"\g<1>{key}:{value}", rows[i])
        return "\n".join(rows)
    return edit


def rewrite_benchmark(text: str) -> str:
    """Changes the embedded data/benchmark.py and records the new text's sha256, so the file
    hashes right but is not the official code."""
    m = re.search(r"source: data/benchmark\.py sha256:([0-9a-f]{64})\n=+\n", text)
    end = text.index("\n" + BAR + "\n", m.end()) + 1
    body = text[m.end():end].replace("\n", "\n# a different benchmark\n", 1)
    sha = hashlib.sha256(body.encode()).hexdigest()
    return text[:m.start(1)] + sha + text[m.end(1):m.end()] + body + text[end:]


def drop_line(start: str):
    return lambda text: "\n".join(r for r in text.split("\n") if not r.startswith(start))


def summary_field(key: str, value: str):
    return lambda text: re.sub(rf"^{key}:.*$", f"{key}:{value}", text, count=1, flags=re.M)


def val_losses(path) -> list[tuple[int, float]]:
    return [(ln.step, ln.num("val_loss")) for ln in parse_text(path).lines() if ln.kind == "val"]


def tiny_track(runs, target: float) -> Track:
    return Track("tiny", target, str(runs[1]), "a test track on the tiny shards")


def claim_tiny(text: str) -> str:
    """The run's claim is its config's `track` (a claim is what verify checks, not trusts)."""
    return text.replace("\ntrack: ''\n", "\ntrack: tiny\n")


# ---------------------------------------------------------------------------------- genuine logs

def test_a_genuine_log_verifies(runs):
    logs, _ = runs
    v = verify(logs / "good.txt")  # with its .jsonl beside it: the two agree too
    assert v.track is None and not v.reached and v.why == "it claims no track"
    assert v.hardware.startswith("1x CPU (") and v.tokens <= 12 * 512
    assert [ln.step for ln in v.log.lines() if ln.warmup] == [1]  # timed apart, not in train_time
    proc = subprocess.run([sys.executable, "leaderboard.py", "verify", str(logs / "good.txt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout and "1x CPU" in proc.stdout


def test_a_genuine_resumed_log_verifies(runs):
    logs, _ = runs
    v = verify(logs / "resumed.txt")
    assert len(v.log.segments) == 2 and v.log.segments[1].resumed_from() == 6
    straight = verify(logs / "good.txt")
    assert v.tokens == straight.tokens and v.val_loss == straight.val_loss  # resuming is exact


def test_the_score_is_train_time_at_the_first_full_evaluation_reaching_the_target(runs):
    logs, _ = runs
    evals = val_losses(logs / "good.txt")
    target = max(loss for _, loss in evals)
    step = next(s for s, loss in evals if loss <= target)
    v = verify(logs / "good.txt", track="tiny", tracks={"tiny": tiny_track(runs, target)})
    steps = {ln.step: ln for ln in v.log.lines() if ln.kind == "step"}
    assert v.reached and v.score_step == step and v.score == steps[step].num("train_time")
    assert f"reached at step {step}" in v.describe()
    resumed = verify(logs / "resumed.txt", track="tiny", tracks={"tiny": tiny_track(runs, target)})
    assert resumed.reached and resumed.score_step == step


# ---------------------------------------------------------------------------------- tampering

TAMPERING = {
    "source edited": (lambda t: t.replace("def train_step(", "def train_steq(", 1),
                      "embedded source train.py does not hash to its recorded sha256"),
    "benchmark code replaced": (rewrite_benchmark, "data/benchmark.py (sha256"),
    "tokens above step x batch": (set_field("step:3/12 loss:", "tokens", "99999"),
                                  "tokens:99999 at step 3 exceeds step x batch_size = 1536"),
    # step 6 claims more time than step 9 has (whatever the machine's speed): time goes back at 9
    "train_time backwards": (set_field("step:6/12 loss:", "train_time", "999.0s"), "goes backwards"),
    "eval moved off eval_every": (lambda t: t.replace("step:6/12 val_loss", "step:5/12 val_loss"),
                                  "validation line at step 5, which is neither a multiple of eval_every=6"),
    "final eval deleted": (drop_line("step:12/12 val_loss"), "no final validation line at num_steps=12"),
    "summary val_loss": (summary_field("val_loss", "1.2345"),
                         "summary val_loss:1.2345 disagrees with the final validation line"),
    "summary tokens_all": (summary_field("tokens_all", "9999"),
                           "summary tokens_all:9999 disagrees with num_steps x batch_size (6144)"),
    "warm-up time moved into train_time": (set_field("step:1/12 loss:", "train_time", "0.5s"),
                                           "at the first step, which is warm-up"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_rejected_naming_the_problem(runs, tmp_path, case, capsys):
    edit, phrase = TAMPERING[case]
    log = copy(runs, tmp_path, edit=edit)
    assert leaderboard.main(["verify", str(log)]) == 1
    err = capsys.readouterr().err
    assert "rejected" in err and phrase in err, err
    assert all(line.startswith("good.txt") for line in err.splitlines()[1:]), err  # each names the log


def test_replaced_benchmark_code_hashes_right_but_is_not_official(runs, tmp_path):
    with pytest.raises(Rejected) as e:
        verify(copy(runs, tmp_path, edit=rewrite_benchmark))
    text = "\n".join(e.value.problems)
    assert "is not an official version of the benchmark code" in text and "does not hash" not in text


def test_an_earlier_benchmark_version_listed_as_accepted_passes(runs, tmp_path):
    log = copy(runs, tmp_path, edit=rewrite_benchmark)
    sha = re.search(r"source: data/benchmark\.py sha256:(\w+)", read(log))[1]
    from submissions.logcheck import accepted_versions

    listed = tmp_path / "benchmark_code.sha256"
    listed.write_text(f"# reviewed\n{sha}  data/benchmark.py\n")
    verify(log, accepted=accepted_versions(listed))


def test_text_that_disagrees_with_its_jsonl_is_rejected(runs, tmp_path):
    log = copy(runs, tmp_path, edit=set_field("step:6/12 loss:", "loss", "2.1000"), jsonl=True)
    with pytest.raises(Rejected, match=r"loss:2\.1000 disagrees with the \.jsonl"):
        verify(log)


def test_a_claimed_track_whose_target_is_not_reached(runs, tmp_path, monkeypatch, capsys):
    logs, _ = runs
    best = min(loss for _, loss in val_losses(logs / "good.txt"))
    monkeypatch.setitem(TRACKS, "tiny", tiny_track(runs, round(best - 0.1, 3)))
    v = verify(logs / "good.txt", track="tiny")
    assert not v.reached and f"above the tiny target {round(best - 0.1, 3)}" in v.why
    assert leaderboard.main(["verify", str(logs / "good.txt"), "--track", "tiny"]) == 1
    assert "no record: its best full validation loss" in capsys.readouterr().out
    # claiming the track in the config is the same claim
    claimed = copy(runs, tmp_path, edit=claim_tiny)
    assert leaderboard.main(["verify", str(claimed)]) == 1


def test_a_track_on_other_data_is_rejected(runs):
    logs, _ = runs
    with pytest.raises(Rejected, match="claims track esm2-8m, scored on data 'omg_prot50'"):
        verify(logs / "good.txt", track="esm2-8m")


def test_evaluations_on_other_splits_are_rejected(runs):
    """A track fixes its splits by their masked-token counts: a run scored elsewhere is caught."""
    logs, _ = runs
    v = verify(logs / "good.txt")
    target = max(loss for _, loss in val_losses(logs / "good.txt"))
    val = int(v.log.summary["val_tokens"])
    right = dataclasses.replace(tiny_track(runs, target), val_tokens=val)
    assert verify(logs / "good.txt", track="tiny", tracks={"tiny": right}).reached
    wrong = dataclasses.replace(right, val_tokens=val + 1)
    with pytest.raises(Rejected, match=f"scored {val:,} masked tokens, but the tiny val split has {val + 1:,}"):
        verify(logs / "good.txt", track="tiny", tracks={"tiny": wrong})
    # a track that pins its shards' sha256: the log records the digest of what it evaluated on
    digest = v.log.segments[0].notes["valid_sha256"]
    pinned = dataclasses.replace(right, valid_sha256=digest)
    assert verify(logs / "good.txt", track="tiny", tracks={"tiny": pinned}).reached
    other = dataclasses.replace(right, valid_sha256="0" * 64)
    with pytest.raises(Rejected, match="its valid_sha256 is .* not the tiny split's 000000000000"):
        verify(logs / "good.txt", track="tiny", tracks={"tiny": other})


def test_a_file_that_is_not_a_run_log_exits_2(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\n")
    for path in (junk, tmp_path / "missing.txt"):
        proc = subprocess.run([sys.executable, "leaderboard.py", "verify", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and str(path) in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- render, plot

def test_render_ranks_the_good_log_and_rejects_the_tampered_one(runs, tmp_path, monkeypatch):
    logs, _ = runs
    target = max(loss for _, loss in val_losses(logs / "good.txt"))
    monkeypatch.setitem(TRACKS, "tiny", tiny_track(runs, target))
    kept = tmp_path / "kept"
    kept.mkdir()
    copy(runs, kept, edit=claim_tiny)
    shutil.copy(logs / "good.jsonl", kept / "good.jsonl")
    jsonl = kept / "good.jsonl"
    jsonl.write_text(jsonl.read_text().replace('"track": ""', '"track": "tiny"', 1))
    copy(runs, kept, edit=lambda t: claim_tiny(set_field("step:3/12 loss:", "tokens", "99999")(t)), as_name="bad")
    copy(runs, kept, name="resumed", jsonl=True)
    out = tmp_path / "LEADERBOARD.md"
    assert leaderboard.main(["render", "--logs", str(kept), "--out", str(out)]) == 0
    md = out.read_text()
    tiny = md[md.index("## tiny"):md.index("## Runs without a record")]
    assert "| 1 |" in tiny and "[good](kept/good.txt)" in tiny and "unconfirmed: 1 of 3 seeds" in tiny
    assert "1x CPU" in tiny and "(development track)" in tiny
    assert "[resumed](kept/resumed.txt) | - | it claims no track" in md
    rejected = md[md.index("## Rejected logs"):]
    assert "[bad](kept/bad.txt)" in rejected and "exceeds step x batch_size" in rejected
    assert "[bad]" not in tiny
    assert md.index("## esm2-8m") < md.index("## tiny")  # the OMGprot50 tracks come first
    assert "2026-05-20" in md  # the price table's date
    png = kept / "plots" / "tiny.png"
    assert png.read_bytes()[:8] == PNG and "(kept/plots/tiny.png)" in md


def test_three_seeds_of_one_submission_make_a_record(runs, tmp_path, monkeypatch):
    logs, _ = runs
    target = max(loss for _, loss in val_losses(logs / "good.txt"))
    monkeypatch.setitem(TRACKS, "tiny", tiny_track(runs, target))
    for seed in range(3):
        copy(runs, tmp_path, edit=lambda t, s=seed: claim_tiny(t).replace("\nseed: 0\n", f"\nseed: {s}\n"),
             as_name=f"seed{seed}")
    verdicts = [verify(tmp_path / f"seed{s}.txt") for s in range(3)]
    status, records = board.statuses(verdicts[:2])
    assert not records and status[id(verdicts[0])] == "unconfirmed: 2 of 3 seeds"
    status, records = board.statuses(verdicts)
    assert status[id(verdicts[0])].startswith("confirmed: mean")
    assert len(records) == 1 and records[0].startswith("Record on 1x CPU (") and "seed2" in records[0]


def without_source(text: str, path: str) -> str:
    """The log without one embedded source block (as when a run did not import that module)."""
    start = text.index(f"{BAR}\nsource: {path} sha256:")
    end = text.index(f"{BAR}\nsource: ", start + len(BAR) + 1)
    return text[:start] + text[end:]


def test_a_source_only_one_run_embeds_does_not_split_a_submission(runs, tmp_path, monkeypatch):
    logs, _ = runs
    monkeypatch.setitem(TRACKS, "tiny", tiny_track(runs, 9.0))
    one = verify(copy(runs, tmp_path, edit=claim_tiny, as_name="one"))
    # e.g. data/prepare.py is imported only by the run that prepared the sample first
    two = verify(copy(runs, tmp_path, edit=lambda t: without_source(claim_tiny(t), "optim/schedules.py"),
                      as_name="two"))
    assert board.same_submission(one, two)
    def other_rate(text):  # in the config block, the last mask_rate line (not the embedded yaml)
        i = text.rindex("\nmask_rate: 0.2\n")
        return claim_tiny(text[:i] + "\nmask_rate: 0.3\n" + text[i + len("\nmask_rate: 0.2\n"):])

    other_recipe = verify(copy(runs, tmp_path, edit=other_rate, as_name="three"))
    assert not board.same_submission(one, other_recipe)


def test_plot_draws_any_runs(runs, tmp_path):
    logs, _ = runs
    out = tmp_path / "curves.png"
    assert leaderboard.main(["plot", str(logs / "good.txt"), str(logs / "resumed.txt"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_a_length_bucketed_log_verifies_with_its_fewer_token_slots(runs, tmp_path):
    """Bucketed micro-batches hold floor(rows x L / L_k) rows of L_k, up to L_k slots short of
    rows x L, so tokens_all and tok/s_all fall below num_steps x batch_size; verify allows
    exactly that much and no more."""
    from submissions.logcheck import fewest_step_slots

    # 512 slots per micro-batch: rows of 96 leave 32 empty (5 x 96 = 480); 2 micro-batches of 256: 2 x 192
    assert fewest_step_slots({"batch_size": 512, "max_length": 128, "length_buckets": 4}, 1) == 480
    assert fewest_step_slots({"batch_size": 512, "max_length": 128, "length_buckets": 4, "grad_accum": 2}, 1) == 384
    assert fewest_step_slots({"batch_size": 512, "max_length": 128, "length_buckets": 1}, 1) == 512
    _, records = run_train(tmp_path, runs[1], "bucketed", *RUN, "--length_buckets", "4")
    summary = [r for r in records if r["kind"] == "summary"][0]
    assert 12 * 480 <= summary["tokens_all"] < 12 * 512  # the run did use short-slotted buckets
    log = tmp_path / "logs" / "bucketed.txt"
    verify(log)
    low = copy((tmp_path / "logs", None), tmp_path, name="bucketed", edit=summary_field("tokens_all", "5000"),
               as_name="low")
    with pytest.raises(Rejected, match="tokens_all:5000 is not between 5760 and 6144"):
        verify(low)


def test_a_profiled_run_is_no_submission(runs, tmp_path):
    """train.py refuses --profile_steps with a track; a log edited to claim one is caught too."""
    logs, _ = runs
    target = max(loss for _, loss in val_losses(logs / "good.txt"))
    profiled = copy(runs, tmp_path, edit=lambda t: claim_tiny(t).replace("\nprofile_steps: ''\n", "\nprofile_steps: '3:4'\n"))
    with pytest.raises(Rejected, match=r"profiled \(--profile_steps\)"):
        verify(profiled, track="tiny", tracks={"tiny": tiny_track(runs, target)})
