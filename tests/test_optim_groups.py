"""Parameter routing, the config, and the combined optimizer (state round trip)."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optim import (
    OptimConfig,
    apply_schedule,
    build_optimizer,
    build_param_groups,
    check_partition,
    default_optim_config,
)


class Head(nn.Module):
    def __init__(self, d, vocab, decoder_weight=None):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab, bias=False)
        if decoder_weight is not None:
            self.decoder.weight = decoder_weight
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h):
        return self.decoder(self.norm(F.gelu(self.dense(h)))) + self.bias


class TinyLM(nn.Module):
    """Named like the real models (docs/INTERFACES.md): embed, value_embeds, blocks, lm_head."""

    def __init__(self, d=16, vocab=33, tie=False, head_first=False):
        super().__init__()
        embed = nn.Embedding(vocab, d)
        if head_first:  # registration order decides which alias named_parameters() reports
            self.lm_head = Head(d, vocab, embed.weight if tie else None)
            self.embed = embed
        else:
            self.embed = embed
            self.lm_head = Head(d, vocab, embed.weight if tie else None)
        self.value_embeds = nn.ModuleList([nn.Embedding(vocab, d)])
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.mlp = nn.Linear(d, 2 * d)
        self.conv = nn.Parameter(torch.randn(d, 2, d // 2) / 4)  # a >2-D hidden matrix
        self.skip_weights = nn.Parameter(torch.ones(2))

    def forward(self, ids):
        x = self.embed(ids) + self.value_embeds[0](ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.skip_weights[0] * F.scaled_dot_product_attention(q, k, v)
        x = x + self.skip_weights[1] * self.mlp(x)[..., : x.shape[-1]]
        x = x + x @ self.conv.flatten(1)
        return self.lm_head(x)


def names_by_group(model, cfg):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {
        g["name"]: sorted(ids[id(p)] for p in g["params"]) for g in build_param_groups(model, cfg)
    }


def test_speedrun_routing_and_learning_rates():
    model, cfg = TinyLM(), default_optim_config("speedrun")
    assert names_by_group(model, cfg) == {
        "embed": ["embed.weight", "value_embeds.0.weight"],
        "head": ["lm_head.decoder.weight", "lm_head.dense.weight"],
        "head_no_decay": [
            "lm_head.bias",
            "lm_head.dense.bias",
            "lm_head.norm.bias",
            "lm_head.norm.weight",
        ],
        "scalar": ["mlp.bias", "skip_weights"],
        "hidden": ["conv", "mlp.weight", "qkv.weight"],
    }
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert {n: g["base_lr"] for n, g in groups.items()} == {
        "embed": 0.06,
        "head": 0.008,
        "head_no_decay": 0.008,
        "scalar": 0.04,
        "hidden": 0.05,
    }
    assert groups["hidden"]["optimizer"] == "muon" and not groups["hidden"]["lr_warmup"]
    assert all(g["weight_decay"] == 0 and g["lr"] == g["base_lr"] for g in groups.values())


def test_esm2_recipe_decays_matrices_only_and_uses_one_lr():
    model, cfg = TinyLM(), default_optim_config("esm2_8m")
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert all(g["optimizer"] == "adamw" and g["base_lr"] == 4e-4 for g in groups.values())
    assert {n: g["weight_decay"] for n, g in groups.items()} == {
        "embed": 0.01,
        "head": 0.01,
        "head_no_decay": 0.0,
        "scalar": 0.0,
        "hidden": 0.01,
    }
    assert groups["embed"]["betas"] == (0.9, 0.98) and groups["embed"]["eps"] == 1e-8
    big = default_optim_config("esm2_15b")
    assert (big.lr, big.weight_decay, big.schedule) == (1.6e-4, 0.1, "esm2")


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_decoder_is_the_embedding_and_listed_once(head_first):
    model = TinyLM(tie=True, head_first=head_first)
    groups = build_param_groups(model, default_optim_config("speedrun"))
    embed = next(g for g in groups if g["name"] == "embed")
    assert any(p is model.embed.weight for p in embed["params"])
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))


def test_frozen_parameters_are_not_optimized():
    model = TinyLM()
    model.value_embeds.requires_grad_(False)
    listed = [p for g in build_param_groups(model, OptimConfig()) for p in g["params"]]
    assert all(p is not model.value_embeds[0].weight for p in listed)


def test_parameter_matching_two_groups_is_named():
    model = TinyLM()
    model.lm_head.embed_proj = nn.Linear(4, 4, bias=False)  # both "lm_head." and "embed"
    with pytest.raises(ValueError, match=r"'lm_head\.embed_proj\.weight'.*embed, head"):
        build_param_groups(model, OptimConfig())
    model = TinyLM()
    model.lm_head.scale = model.skip_weights  # one tensor, a head and a scalar name
    with pytest.raises(
        ValueError, match=r"skip_weights, lm_head\.scale would land in groups head, scalar"
    ):
        build_param_groups(model, OptimConfig())


def test_partition_check_names_stray_and_repeated_parameters():
    model = TinyLM()
    groups = build_param_groups(model, OptimConfig())
    hidden = next(g for g in groups if g["name"] == "hidden")
    hidden["params"] = [p for p in hidden["params"] if p is not model.qkv.weight]
    with pytest.raises(ValueError, match=r"qkv\.weight are in no optimizer group"):
        check_partition(model, groups)
    hidden["params"] += [model.qkv.weight, model.qkv.weight]
    with pytest.raises(ValueError, match=r"qkv\.weight are in more than one"):
        check_partition(model, groups)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"name='sgd' is not one of adamw, muon"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match=r"lr_head=-1"):
        OptimConfig(lr_head=-1)
    with pytest.raises(ValueError, match=r"betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"unknown key\(s\) lr_hiden \(did you mean lr_hidden\?\)"):
        OptimConfig.from_dict({"lr_hiden": 0.1})
    with pytest.raises(ValueError, match=r"no default recipe for model preset 'gpt2'"):
        default_optim_config("gpt2")
    cfg = OptimConfig.from_dict(
        {"betas": [0.9, 0.99], "lr_head": None}, base=default_optim_config("sample")
    )
    assert cfg.betas == (0.9, 0.99) and cfg.group_lr("head") == cfg.lr and cfg.warmup_steps == 50


def train(model, opt, cfg, steps, start=0, num_steps=8):
    g = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        apply_schedule(opt, step, cfg, num_steps)
        ids = torch.randint(0, 33, (2, 6), generator=g)
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        g = torch.Generator().manual_seed(step + 1)


@pytest.mark.parametrize("preset", ["speedrun", "esm2_8m"])
def test_state_dict_round_trip_continues_identically(preset):
    cfg = OptimConfig.from_dict({"warmup_steps": 2}, base=default_optim_config(preset))
    torch.manual_seed(0)
    model = TinyLM(tie=preset.startswith("esm2"))
    opt = build_optimizer(model, cfg)
    train(model, opt, cfg, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)

    train(model, opt, cfg, 3, start=3)  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyLM(tie=preset.startswith("esm2"))
    resumed.load_state_dict(saved["model"])
    resumed_opt = build_optimizer(resumed, cfg)
    resumed_opt.load_state_dict(saved["optim"])
    train(resumed, resumed_opt, cfg, 3, start=3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_a_checkpoint_of_another_recipe_is_refused():
    model = TinyLM()
    esm2_state = build_optimizer(model, default_optim_config("esm2_8m")).state_dict()
    opt = build_optimizer(copy.deepcopy(model), default_optim_config("speedrun"))
    with pytest.raises(
        ValueError, match=r"has parts \['adamw'\] but this optimizer has \['adamw', 'muon'\]"
    ):
        opt.load_state_dict(esm2_state)
