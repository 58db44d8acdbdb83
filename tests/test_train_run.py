"""A short train.py run: the run log's fields, their consistency, the header and secrets."""

import hashlib
import math
import re
import subprocess
import sys

import pytest
from train_support import ROOT, TINY, losses, run_train, write_tiny_shards

SECRET = "hf_SuperSecretValue123"
STEP_KEYS = ["step", "loss", "lr", "tokens", "tok/s", "tok/s_all", "mfu", "train_time", "step_avg", "pad", "mem"]
EVAL_KEYS = ["val_loss", "val_ppl", "val_acc", "val_precision", "val_recall", "val_f1", "val_mcc", "val_tokens"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data = write_tiny_shards(tmp / "data")
    env = {"HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET[::-1], "WANDB_MODE": "offline", "WANDB_DIR": str(tmp)}
    proc, records = run_train(tmp, data, "tiny", "--num_steps", "12", "--eval_every", "6", "--log_every", "3",
                              "--wandb", "--save_every", "6", env=env)
    return tmp, proc, records, (tmp / "logs" / "tiny.txt").read_text()


def fields(line: str) -> dict:
    return dict(kv.split(":", 1) for kv in line.split())


def test_step_lines_carry_every_field(run):
    _, _, _, text = run
    steps = [fields(x) for x in text.splitlines() if x.startswith("step:") and " loss:" in x]
    # step 1 is the warm-up step, logged on its own line whatever log_every says
    assert [s["step"] for s in steps] == ["1/12", "3/12", "6/12", "9/12", "12/12"]
    for s in steps:
        assert list(s)[: len(STEP_KEYS)] == STEP_KEYS
        assert s["mfu"] == "n/a"  # no known CPU peak
        assert math.isfinite(float(s["loss"]))
        # the padding fraction agrees with the two throughputs, as far as their printing allows:
        # each is a whole number of tok/s (off by up to 0.5), which moves their ratio by up to
        # 1/tok/s_all (a slow machine prints small ones), and pad has 4 decimals
        printed = 1.0 / float(s["tok/s_all"]) + 5e-5
        assert float(s["pad"]) == pytest.approx(1 - float(s["tok/s"]) / float(s["tok/s_all"]), abs=printed)


def test_eval_lines_and_ppl_is_exp_loss(run):
    _, _, records, text = run
    evals = [fields(x) for x in text.splitlines() if "val_loss:" in x and x.startswith("step:")]
    assert [e["step"] for e in evals] == ["6/12", "12/12"]
    for e in evals:
        assert list(e)[1:] == EVAL_KEYS
        loss, ppl = float(e["val_loss"]), float(e["val_ppl"])
        assert abs(math.exp(loss) - ppl) <= ppl * 6e-5 + 6e-5  # printed to 4 decimals
        assert 0 <= float(e["val_acc"]) <= 1 and -1 <= float(e["val_mcc"]) <= 1
        assert float(e["val_recall"]) == pytest.approx(float(e["val_acc"]), abs=1e-4)  # support-weighted recall
    summary = [r for r in records if r["kind"] == "summary"][0]
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-12)
    assert summary["test_ppl"] == pytest.approx(math.exp(summary["test_loss"]), rel=1e-12)
    assert summary["val_tokens"] > 0 and summary["test_tokens"] > 0


def test_jsonl_matches_the_text(run):
    _, _, records, text = run
    steps = [r for r in records if r["kind"] == "step"]
    assert list(losses(records)) == [1, 3, 6, 9, 12]
    printed = [float(fields(x)["loss"]) for x in text.splitlines() if x.startswith("step:") and " loss:" in x]
    assert printed == [round(r["loss"], 4) for r in steps]
    tokens = [r["tokens"] for r in steps]
    assert tokens == sorted(tokens) and tokens[-1] <= 12 * 512
    assert all(r["tokens_all"] if "tokens_all" in r else True for r in steps)
    # train_time leaves out the warm-up step, whose time is logged as warmup_time
    assert steps[-1]["train_time"] == pytest.approx(steps[-1]["step_avg"] * 11 / 1000, rel=1e-9)
    assert steps[0]["warmup_time"] > 0 and steps[0]["train_time"] == 0 and steps[0]["step_avg"] is None
    assert all("warmup_time" not in r for r in steps[1:])
    summary = [r for r in records if r["kind"] == "summary"][0]
    assert summary["warmup_time"] == steps[0]["warmup_time"] and summary["train_time"] == steps[-1]["train_time"]


def test_header_holds_sources_with_their_hashes(run):
    _, _, _, text = run
    sources = dict(re.findall(r"^source: (\S+) sha256:([0-9a-f]{64})$", text, re.M))
    for name in ("train.py", "runtime/backend.py", "model/speedrun.py", "data/loader.py", "config/sample.yaml"):
        assert sources[name] == hashlib.sha256((ROOT / name).read_bytes()).hexdigest(), name
    # the validation and test shards' sha256, so a leaderboard track can pin its data
    tmp = run[0]
    for split in ("valid", "test"):
        digest = hashlib.sha256((tmp / "data" / f"tiny_{split}_000000.bin").read_bytes()).hexdigest()
        assert re.search(rf"^{split}_sha256: {digest}$", text, re.M), split
    assert "\nenvironment\n" in text and "world_size: 1" in text and "\nconfig\n" in text
    assert "num_steps: 12" in text  # the resolved config, overrides applied
    assert re.search(r"^summary$", text, re.M) and re.search(r"^test_loss:\d", text, re.M)


def test_no_secret_reaches_any_output(run):
    tmp, proc, _, _ = run
    outputs = [proc.stdout, proc.stderr] + [p.read_text(errors="replace") for p in (tmp / "logs").iterdir()]
    for out in outputs:
        assert SECRET not in out and SECRET[::-1] not in out


def test_wandb_offline_run_was_written(run):
    tmp, _, _, _ = run
    assert list((tmp / "wandb").glob("offline-run-*")), "no offline wandb run directory"


def test_checkpoints_kept_and_final(run):
    tmp, _, _, _ = run
    assert sorted(p.name for p in (tmp / "ckpt" / "tiny").iterdir()) == ["step_000006", "step_000012"]


def test_a_run_shorter_than_the_configs_warmup_shrinks_it_and_says_so(tmp_path):
    """sample.yaml's warmup_steps: 20 on a 5-step run: the run trains with a fitted warm-up,
    says so in one log line, and logs the warm-up it used; set on the command line it is refused."""
    data = write_tiny_shards(tmp_path / "data", n_train=60)
    i = TINY.index("--optim.warmup_steps")
    without_warmup = TINY[:i] + TINY[i + 2:]
    common = ["train.py", *without_warmup, "--data", str(data), "--num_steps", "5",
              "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "ckpt")]
    proc = subprocess.run([sys.executable, *common, "--log_name", "short"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "logs" / "short.txt").read_text()
    notes = [x for x in text.splitlines() if x.startswith("note: warmup_steps")]
    assert notes == ["note: warmup_steps=20 does not fit a 5-step run; using warmup_steps=0 "
                     "(set --optim.warmup_steps to choose)"]
    assert "\noptim:\n  warmup_steps: 0\n" in text, "the logged config holds the fitted warm-up"
    assert "step:5/5" in text
    refused = subprocess.run([sys.executable, *common, "--log_name", "refused", "--optim.warmup_steps", "20"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "warmup_steps=20 does not fit" in refused.stderr


def test_a_config_from_outside_with_blank_last_lines_embeds_exactly_and_verifies(tmp_path):
    """The run log embeds every source byte for byte (blank last lines too), and a config from
    outside the project under external/<name>: leaderboard verify re-hashes both and accepts."""
    from submissions.logcheck import verify

    data = write_tiny_shards(tmp_path / "data", n_train=40)
    config = tmp_path / "elsewhere" / "mine.yaml"
    config.parent.mkdir()
    config.write_text((ROOT / "config" / "sample.yaml").read_text() + "\n\n\n")
    run_train(tmp_path, data, "outside", "--config", str(config), "--num_steps", "3")
    log = tmp_path / "logs" / "outside.txt"
    names = re.findall(r"^source: (\S+) sha256:", log.read_text(), re.M)
    assert "external/mine.yaml" in names and not any(n.startswith("/") for n in names)
    verify(log)  # raises Rejected if an embedded source no longer hashed to its sha256
