"""TrainConfig: presets, CLI overrides, one-sentence errors."""

import dataclasses
from pathlib import Path

import pytest

from training.config import ConfigError, TrainConfig, load_config, model_config, optim_config

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_are_typed_and_win_over_the_preset():
    cfg = load_config(["--config", str(ROOT / "config/sample.yaml"), "--num_steps", "70", "--mask_rate=3e-1",
                       "--model_args.n_layers", "3", "--optim.lr_hidden", "1e-2", "--wandb"])
    assert cfg.num_steps == 70 and cfg.mask_rate == 0.3 and cfg.wandb is True
    assert cfg.model == "sample" and cfg.data == "sample"  # from the file
    assert model_config(cfg).n_layers == 3
    assert optim_config(cfg).lr_hidden == 0.01


def test_backend_defaults_lose_to_user_model_args():
    cfg = load_config(["--config", str(ROOT / "config/sample.yaml")])
    assert model_config(cfg, attn_impl="flex").attn_impl == "flex"
    cfg.model_args = {"attn_impl": "sdpa"}
    assert model_config(cfg, attn_impl="flex").attn_impl == "sdpa"


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_is_valid(path):
    cfg = load_config(["--config", str(path)])
    model_config(cfg)
    optim_config(cfg)
    assert cfg.micro_batch_rows(8) >= 1 if path.stem != "sample" else cfg.micro_batch_rows(1) >= 1


def test_speedrun_yaml_lists_every_option():
    text = (ROOT / "config/speedrun.yaml").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "config_file" and f"\n{f.name}:" not in "\n" + text]
    assert not missing


@pytest.mark.parametrize("argv, words", [
    (["--num_step", "3"], ["num_step", "num_steps"]),
    (["--num_steps", "many"], ["num_steps", "integer"]),
    (["--num_steps", "0"], ["num_steps", "> 0"]),
    (["--device", "tpu"], ["device", "cpu"]),
    (["--mask_rate", "1.5"], ["mask_rate"]),
    (["--wandb", "maybe"], ["wandb", "true or false"]),
    (["--seed.x", "1"], ["seed"]),
    (["--config", "config/nope.yaml"], ["nope.yaml", "sample"]),
    (["stray"], ["stray"]),
    (["--model", "huge"], ["huge", "preset"]),
    (["--model_args.layers", "2"], ["layers"]),
    (["--optim.lr", "-1"], ["lr"]),
    (["--track", "esm2-9m"], ["esm2-9m", "esm2-8m", "cpu-sample"]),
    (["--track", "esm2-8m"], ["esm2-8m", "omg_prot50", "sample"]),  # sample data cannot claim it
    (["--length_buckets", "3"], ["length_buckets=3", "max_length=512", "such as 8"]),
    (["--length_buckets", "0"], ["length_buckets", "> 0"]),
    (["--length_buckets", "2", "--model", "patch_unet"], ["length_buckets", "patch_unet"]),
])
def test_bad_input_is_one_sentence(argv, words):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(["--config", str(ROOT / "config/sample.yaml"), *argv])
        model_config(cfg)
        optim_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_batch_must_divide_into_rows():
    cfg = load_config(["--config", str(ROOT / "config/sample.yaml"), "--batch_size", "16384", "--max_length", "512"])
    assert cfg.micro_batch_rows(2) == 16
    cfg.grad_accum = 3
    with pytest.raises(ConfigError, match="not divisible by world_size"):
        cfg.micro_batch_rows(2)


def test_warmup_set_on_the_command_line_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="warmup_steps=30 does not fit"):
        optim_config(load_config(["--config", str(ROOT / "config/sample.yaml"), "--num_steps", "10",
                                  "--optim.warmup_steps", "30"]))


@pytest.mark.parametrize("config,steps,fitted", [
    ("config/sample.yaml", 20, 2),      # the YAML's warmup_steps: 20 -> a tenth of the run
    ("config/sample.yaml", 1, 0),
    ("config/esm2_8m.yaml", 100, 9),   # the preset's 2000 -> a tenth of esm2's 90% decay end
])
def test_a_warmup_from_a_config_or_preset_shrinks_to_fit_a_short_run(config, steps, fitted):
    cfg = load_config(["--config", str(ROOT / config), "--num_steps", str(steps)])
    assert optim_config(cfg).warmup_steps == fitted
    assert cfg.optim["warmup_steps"] == fitted and "warmup_steps" in cfg.to_dict()["optim"]
    assert len(cfg.notes) == 1 and f"using warmup_steps={fitted}" in cfg.notes[0]
    assert "notes" not in cfg.to_dict()


def test_a_warmup_that_fits_is_left_alone():
    cfg = load_config(["--config", str(ROOT / "config/sample.yaml"), "--num_steps", "21"])
    assert optim_config(cfg).warmup_steps == 20 and cfg.notes == () and "warmup_steps" in cfg.optim
