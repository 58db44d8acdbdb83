"""evaluation.overlap: the benchmark loss split by whether a residue's context occurs in train."""

import numpy as np
import pytest
import torch

from data.benchmark import EvalLoader
from data.shards import join_documents, read_shard, write_shard
from data.tokenizer import encode
from evaluation.benchmark import evaluate
from evaluation.overlap import copied_positions, loss_by_overlap, main
from model import build_model, get_config
from model.io import save_weights
from runtime.backend import CPUBackend

SMALL = dict(n_layers=2, d_model=32, n_heads=2, d_ff=64)
RNG = np.random.default_rng(0)
AA = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
COPY = "".join(RNG.choice(AA, 90))
TRAIN = [COPY, *("".join(RNG.choice(AA, int(n))) for n in RNG.integers(30, 200, 20))]
VALID = [*("".join(RNG.choice(AA, int(n))) for n in RNG.integers(30, 1300, 6)), COPY]  # one longer than 1024


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap")
    write_shard(out / "toy_train_000000.bin", join_documents([encode(s) for s in TRAIN]))
    write_shard(out / "toy_valid_000000.bin", join_documents([encode(s) for s in VALID]))
    return out


def test_the_copy_is_copied_and_random_proteins_are_not(data):
    train, held = (np.asarray(read_shard(data / f"toy_{s}_000000.bin")) for s in ("train", "valid"))
    copied = copied_positions(train, held, 3)
    last = len(held) - len(COPY) - 2  # the copy's <cls>
    assert copied[last + 1 + 2 : last + 1 + len(COPY) - 2].all()  # its residues with a full +-3 window in train
    assert copied.sum() == len(COPY) + 2 - 6  # and nothing else (<cls>/<eos> inside the window)


def test_the_split_losses_average_to_the_benchmark_loss(data):
    torch.manual_seed(0)
    model = build_model(get_config("sample", **SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    train, held = (np.asarray(read_shard(data / f"toy_{s}_000000.bin")) for s in ("train", "valid"))
    out = loss_by_overlap(model, train, held, 3)
    bench = evaluate(model, EvalLoader([data / "toy_valid_000000.bin"], 4, 1024), CPUBackend())
    (lc, nc), (ln, nn) = out["copied"], out["novel"]
    assert 0 < nc < nn and nc + nn == bench["tokens"]
    assert (lc * nc + ln * nn) / (nc + nn) == pytest.approx(bench["loss"], rel=1e-5)


def test_cli_prints_the_table_and_refuses_bad_input(data, tmp_path, capsys):
    cfg = get_config("sample", **SMALL)
    save_weights(tmp_path / "w.pt", build_model(cfg), cfg)
    assert main(["--checkpoint", str(tmp_path / "w.pt"), "--data", str(data), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "| copied |" in out and "| novel |" in out and "| all |" in out
    assert main(["--checkpoint", str(tmp_path / "w.pt"), "--data", str(data), "--k", "0"]) == 2
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data)]) == 2
    assert main(["--checkpoint", str(tmp_path / "w.pt"), "--data", str(data), "--split", "test"]) == 2
    assert "needs train and test shards" in capsys.readouterr().err
