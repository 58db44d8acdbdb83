"""Hugging Face parity: random-initialised EsmForMaskedLM (8M and 35M shapes) -> import ->
same logits on real sequences with padding and <mask>; export -> HF loads the same model."""

import gzip
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import EsmConfig, EsmForMaskedLM  # noqa: E402
from transformers.models.esm.configuration_esm import get_default_vocab_list  # noqa: E402

from hub.cli import main as hf_cli  # noqa: E402
from model import build_model, get_config  # noqa: E402
from model.io import load_state_dict_checked, load_weights, save_weights  # noqa: E402

SAMPLE = Path(__file__).parents[1] / "data" / "sample" / "uniprot_sample_20k.fasta.gz"
VOCAB = {tok: i for i, tok in enumerate(get_default_vocab_list())}
SHAPES = {"esm2_8m": (6, 320, 20), "esm2_35m": (12, 480, 20)}


def sample_sequences(n=4, max_len=120):
    """The first n sequences of the shipped sample that are at most max_len long."""
    seqs, cur = [], []
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if cur and len("".join(cur)) <= max_len:
                    seqs.append("".join(cur))
                cur = []
                if len(seqs) == n:
                    break
            else:
                cur.append(line.strip())
    return seqs


def padded_batch():
    """ESM tokens of real sequences, right-padded, with <mask> in some (token dropout path)."""
    rows = [[0] + [VOCAB.get(c, 3) for c in s] + [2] for s in sample_sequences()]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), 1)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    g = torch.Generator().manual_seed(0)
    residue = ids > 3
    ids[:2][residue[:2] & (torch.rand(ids[:2].shape, generator=g) < 0.2)] = 32
    ids[2, 5:40] = 32  # a heavily masked sequence: a very different rescale factor
    return ids, (ids != 1).long()


def random_hf(shape):
    layers, d, heads = SHAPES[shape]
    cfg = EsmConfig(
        vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=d, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * d, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
        position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=True,
    )
    torch.manual_seed(0)
    hf = EsmForMaskedLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: make every one count
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf


def ours_from(checkpoint):
    cfg, sd = load_weights(checkpoint)
    model = build_model(cfg).eval()
    load_state_dict_checked(model, sd)
    return model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_import_and_export_match_hugging_face(tmp_path, shape):
    hf = random_hf(shape)
    hf.save_pretrained(tmp_path / "hf")
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "ours.pt")]) == 0
    ours = ours_from(tmp_path / "ours.pt")
    assert ours.cfg == get_config(shape)

    ids, attention_mask = padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=attention_mask).logits
        got, _ = ours(ids, torch.where(real, 0, -1))
    assert (got[real] - expected[real]).abs().max() < 1e-5

    assert hf_cli(["export", str(tmp_path / "ours.pt"), str(tmp_path / "out")]) == 0
    back = EsmForMaskedLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=attention_mask).logits
    assert (again[real] - expected[real]).abs().max() < 1e-5
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("MK<mask>")["input_ids"] == [
        0, VOCAB["M"], VOCAB["K"], 32, 2]


def test_export_of_a_speedrun_model_is_refused(tmp_path, capsys):
    cfg = get_config("sample", n_layers=2, d_model=32, n_heads=4, d_ff=64)
    save_weights(tmp_path / "s.pt", build_model(cfg), cfg)
    assert hf_cli(["export", str(tmp_path / "s.pt"), str(tmp_path / "out")]) == 1
    assert "'speedrun' model has no Hugging Face equivalent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_of_a_non_esm2_model_is_refused(tmp_path, capsys):
    cfg = EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=32,
                    num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    position_embedding_type="absolute")
    EsmForMaskedLM(cfg).save_pretrained(tmp_path / "hf")
    assert hf_cli(["import", str(tmp_path / "hf"), str(tmp_path / "x.pt")]) == 1
    assert "not the ESM2 architecture" in capsys.readouterr().err
