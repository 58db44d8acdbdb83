"""Embeddings (evaluation/embed.py, embed.py): packed batches give what each sequence gives alone
through model.encode, for every pooling and layer, both architectures, our checkpoints and
Hugging Face ESM2 models, in input order; bad inputs get one clear error."""

import gzip
import types
import weakref

import numpy as np
import pytest
import torch

import embed as embed_py
from data.packing import span
from data.tokenizer import CLS, EOS, PAD, encode
from evaluation.embed import HFEncoder, _pack, doc_multiple, embed, load_model
from model import build_model, get_config
from model.io import save_weights
from runtime.errors import ConfigError

TINY = {"speedrun": ("sample", dict(n_layers=3, d_model=32, n_heads=2, d_ff=64)),
        "esm2": ("esm2_8m", dict(n_layers=3, d_model=32, n_heads=4, d_ff=128)),
        # 3 levels: sequences start at multiples of 4 in packed rows (doc_multiple)
        "patch_unet": ("patch_unet", dict(n_layers=6, d_model=32, n_heads=2, d_ff=64, extra_layers=1,
                                          max_length=256))}


def tiny_model(arch, seed=0):
    preset, shape = TINY[arch]
    torch.manual_seed(seed)
    cfg = get_config(preset, **shape)
    model = build_model(cfg)
    with torch.no_grad():  # away from the initialisation (zero-init projections, unit norms)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval(), cfg


def random_sequences(n, seed, lo=1, hi=150):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), rng.integers(lo, hi))) for _ in range(n)]


ALONE = weakref.WeakKeyDictionary()  # model -> {(sequence, max_length): hidden states of every layer}


def alone(model, seq, layer, max_length=10**6):
    """The chosen hidden state of one sequence run by itself: (n + 2, d) with <cls> first, <eos>
    last (a Patch UNet's row padded to a length it can halve)."""
    cache = ALONE.setdefault(model, {})
    if (seq, max_length) not in cache:
        residues = encode(seq)[: max_length - 2]
        n = len(residues) + 2
        L = span(len(residues), doc_multiple(model))
        ids = torch.full((1, L), PAD)
        ids[0, :n] = torch.tensor([CLS, *residues, EOS])
        docs = torch.where(torch.arange(L) < n, 0, -1)[None]
        with torch.no_grad():
            cache[seq, max_length] = [h[0, :n].numpy() for h in model.encode(ids, docs, all_layers=True)]
    return cache[seq, max_length][layer]


def expected(model, seqs, pooling, layer, max_length=10**6):
    hs = [alone(model, s, layer, max_length) for s in seqs]
    if pooling == "cls":
        return np.stack([h[0] for h in hs])
    if pooling == "mean":
        return np.stack([h[1:-1].mean(0) for h in hs])
    return [h[1:-1] for h in hs]


def assert_close(got, want, tol=2e-5):
    """Equal up to float32 rounding, relative to the largest value (hidden states of these
    perturbed tiny models reach the hundreds)."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, np.abs(w).max()))
    else:
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@pytest.fixture(scope="module", params=sorted(TINY))
def packed_case(request):
    """A tiny model, sequences, and each sequence's hidden states run alone (all layers)."""
    model, _ = tiny_model(request.param)
    seqs = random_sequences(30, seed=1)
    return model, seqs


@pytest.mark.parametrize("pooling", ["mean", "cls", "none"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_packed_embeddings_equal_each_sequence_alone(packed_case, pooling, layer):
    model, seqs = packed_case
    rows = _pack([encode(s) for s in seqs], 256, doc_multiple(model), False)
    assert max(len(r) for r in rows) >= 3 and len(rows) < len(seqs)  # really packed, several per row
    laid = [piece[0] for r in rows for piece in r]
    assert laid != sorted(laid)  # first fit moves some sequences ahead: the output is put back in order
    got = embed(model, seqs, pooling=pooling, layer=layer, max_length=256, batch_tokens=512, progress=False)
    assert_close(got, expected(model, seqs, pooling, layer))


def test_layer_indexes_the_hidden_states():
    model, _ = tiny_model("esm2")
    seqs = random_sequences(5, seed=2)
    last, minus, inner = (embed(model, seqs, layer=k, progress=False) for k in (3, -1, 2))
    np.testing.assert_array_equal(last, minus)  # 3 blocks: hidden state 3 is -1, the final one
    assert np.abs(inner - last).max() > 1e-2


def test_long_sequences_are_cropped_and_batches_of_one_row_work():
    model, _ = tiny_model("speedrun")
    seqs = random_sequences(6, seed=3, lo=10, hi=100) + ["M" + "ACDEFGHIKL" * 30]  # 301 residues
    for pooling in ("mean", "none"):
        got = embed(model, seqs, pooling=pooling, max_length=64, batch_tokens=64, progress=False)
        assert_close(got, expected(model, seqs, pooling, -1, max_length=64))
    assert got[-1].shape == (62, 32)


def test_the_backend_autocast_applies():
    """bf16 autocast (the accelerators' default; on the CPU when asked): float32 out, near fp32."""
    from runtime.devices import get_backend

    model, _ = tiny_model("esm2")
    seqs = random_sequences(8, seed=9)
    bf16 = embed(model, seqs, backend=get_backend("cpu", types.SimpleNamespace(precision="bf16")), progress=False)
    fp32 = embed(model, seqs, progress=False)
    error = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
    assert bf16.dtype == np.float32 and 1e-4 < error < 3e-2


@pytest.mark.xla
def test_on_xla_every_batch_is_one_graph():
    pytest.importorskip("torch_xla")
    from runtime.devices import get_backend

    backend = get_backend("xla")
    backend.init_distributed()
    model, _ = tiny_model("speedrun")
    seqs = random_sequences(40, seed=1)  # 14 rows: 5 batches of 3, the last one with a row of padding
    fp32 = embed(model, seqs, max_length=256, batch_tokens=768, progress=False)
    before = backend.compile_count()  # the lane's earlier tests compiled in this process too
    got = embed(model.to(backend.device), seqs, max_length=256, batch_tokens=768, backend=backend, progress=False)
    assert backend.compile_count() - before == 1
    assert got.dtype == np.float32 and np.abs(got - fp32).max() / np.abs(fp32).max() < 3e-2  # bf16 autocast


def test_errors_name_the_input():
    model, _ = tiny_model("speedrun")
    with pytest.raises(ConfigError, match=r"pooling 'max' is unknown; use one of mean, cls, none"):
        embed(model, ["MKV"], pooling="max", progress=False)
    with pytest.raises(ConfigError, match=r"layer 4 is out of range: this model has hidden states 0\.\.3"):
        embed(model, ["MKV"], layer=4, progress=False)
    with pytest.raises(ConfigError, match=r"layer -5 is out of range"):
        embed(model, ["MKV"], layer=-5, progress=False)
    with pytest.raises(ConfigError, match=r"sequence 2 is empty"):
        embed(model, ["MKV", ""], progress=False)
    with pytest.raises(ConfigError, match=r"max_length 2 leaves no room"):
        embed(model, ["MKV"], max_length=2, progress=False)


# ------------------------------------------------------------------------ the command

def write_fasta(path, seqs):
    text = "".join(f">seq{i} some description\n{s[:60]}\n{s[60:]}\n" for i, s in enumerate(seqs))
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    out = {}
    for arch in TINY:
        model, cfg = tiny_model(arch, seed=4)
        save_weights(d / f"{arch}.pt", model, cfg)
        out[arch] = (d / f"{arch}.pt", model)
    return out


@pytest.mark.parametrize("arch", sorted(TINY))
def test_command_writes_embeddings_in_file_order(tmp_path, checkpoints, capsys, arch):
    path, model = checkpoints[arch]
    seqs = random_sequences(25, seed=5, hi=300)
    fasta = write_fasta(tmp_path / "seqs.fasta.gz", seqs)
    argv = [str(path), str(fasta), "--device", "cpu", "--max_length", "128", "--batch_tokens", "512"]
    assert embed_py.main([*argv, "--out", str(tmp_path / "e.npy")]) == 0
    cropped = sum(len(s) > 126 for s in seqs)
    assert cropped and f"25 sequences, {cropped} cropped to 126 residues" in capsys.readouterr().err
    assert_close(np.load(tmp_path / "e.npy"), expected(model, seqs, "mean", -1, max_length=128))

    assert embed_py.main([*argv, "--out", str(tmp_path / "r.npz"), "--pooling", "none", "--layer", "1",
                          "--quiet"]) == 0
    with np.load(tmp_path / "r.npz") as z:
        assert sorted(z.files, key=int) == [str(i) for i in range(25)]
        assert_close([z[str(i)] for i in range(25)], expected(model, seqs, "none", 1, max_length=128))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "r.npz", "seqs.fasta.gz"]  # no leftovers


def test_command_errors(tmp_path, checkpoints, capsys):
    path = str(checkpoints["speedrun"][0])
    fasta = str(write_fasta(tmp_path / "s.fasta", ["MKV", "ACDE"]))
    cpu = ["--device", "cpu", "--quiet"]

    def fails(argv, message):
        assert embed_py.main([*argv, *cpu]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line
        assert not list(tmp_path.glob("out*"))

    fails([path, str(tmp_path / "missing.fasta"), "--out", str(tmp_path / "out.npy")],
          f"{tmp_path / 'missing.fasta'} does not exist; pass a FASTA file")
    fails([str(tmp_path / "nope.pt"), fasta, "--out", str(tmp_path / "out.npy")],
          f"embed.py: {tmp_path / 'nope.pt'} does not exist; pass a weights file or a checkpoint directory.")
    fails([path, fasta, "--out", str(tmp_path / "out.npy"), "--layer", "9"], "layer 9 is out of range")
    fails([path, fasta, "--out", str(tmp_path / "no" / "out.npy")], "its folder does not exist")
    fails([path, fasta, "--out", str(tmp_path / "out.npy"), "--pooling", "none"],
          "per-residue arrays (--pooling none) go to a .npz file; name it *.npz")
    with pytest.raises(SystemExit) as e:
        embed_py.main([path, fasta, "--out", str(tmp_path / "out.npy"), "--pooling", "max"])
    assert e.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err


def test_records_without_residues_are_skipped(tmp_path, checkpoints):
    path, model = checkpoints["esm2"]
    (tmp_path / "s.fasta").write_text(">a\nMKV\n>b\n>c\nACDEF*\n")  # b has none; the stop codon goes
    assert embed_py.main([str(path), str(tmp_path / "s.fasta"), "--out", str(tmp_path / "e.npy"), "--quiet"]) == 0
    assert_close(np.load(tmp_path / "e.npy"), expected(model, ["MKV", "ACDEF"], "mean", -1))


# ------------------------------------------------------------------------ Hugging Face

def tiny_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.EsmConfig(
        vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
        position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=True)
    torch.manual_seed(6)
    hf = transformers.EsmForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def test_hugging_face_model_by_directory(tmp_path, capsys):
    hf, directory = tiny_hf(tmp_path)
    seqs = random_sequences(9, seed=7, hi=80)
    fasta = write_fasta(tmp_path / "s.fasta", seqs)
    out = tmp_path / "h.npy"
    assert embed_py.main([str(directory), str(fasta), "--out", str(out), "--layer", "1", "--device", "cpu",
                          "--batch_tokens", "4096"]) == 0
    assert f"hf:{directory}: 9 sequences" in capsys.readouterr().err
    want = []
    for s in seqs:  # HF as HF users run it: one sequence, no padding
        ids = torch.tensor([[CLS, *encode(s), EOS]])
        with torch.no_grad():
            want.append(hf.esm(input_ids=ids, output_hidden_states=True).hidden_states[1][0, 1:-1].mean(0).numpy())
    assert_close(np.load(out), np.stack(want))


def test_hugging_face_layers_mean_what_ours_mean(tmp_path):
    from model.hf import config_from_hf, state_dict_from_hf

    hf, directory = tiny_hf(tmp_path)
    cfg = config_from_hf(hf.config)
    ours = build_model(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    theirs, name = load_model(str(directory))
    assert isinstance(theirs, HFEncoder) and name == f"hf:{directory}"
    seqs = random_sequences(12, seed=8, hi=120)
    for layer in (0, 1, -1):
        for pooling in ("cls", "none"):
            a = embed(theirs, seqs, pooling=pooling, layer=layer, batch_tokens=2048, progress=False)
            b = embed(ours, seqs, pooling=pooling, layer=layer, batch_tokens=2048, progress=False)
            assert_close(a, b, tol=1e-4)


def test_a_missing_hub_id_is_one_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^no-such-org/no-such-model is no file or directory here, and as a "
                                          r"Hugging Face id: cannot load a Hugging Face ESM model"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ConfigError, match=r"^runs/a/b does not exist; pass a weights file"):
        load_model("runs/a/b")  # a path, not an id
