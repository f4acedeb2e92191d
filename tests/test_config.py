"""Trainer config: the epsilon recipe, layering, overrides, validation and resume compatibility."""
from __future__ import annotations

import pytest

from hakubooru.errors import HakubooruError
from trainers.lokr.__main__ import main
from trainers.lokr.config import check_resume_config, config_fingerprint, load_config


def test_epsilon_is_the_recipe():
    # Values typed from recipe.md §3–4, not read from the TOML.
    cfg = load_config("epsilon")
    t, o, d = cfg["train"], cfg["optimizer"], cfg["data"]
    assert (t["batch_size"], t["grad_accum"]) == (4, 16)
    assert o["name"] == "Lion8bit" and (o["lr_unet"], o["lr_text"]) == (2e-5, 5e-6)
    assert o["warmup_steps"] == 1000 and o["weight_decay"] == 0.1 and o["betas"] == [0.9, 0.95]
    assert t["min_snr_gamma"] == 5.0 and t["noise_offset"] == 0.0357
    assert (d["resolution"], d["bucket_min"], d["bucket_max"], d["bucket_step"]) == (1024, 256, 4096, 64)
    assert d["tag_dropout"] == 0.15 and d["max_windows"] == 3
    assert t["mixed_precision"] == "fp16" and t["gradient_checkpointing"] and t["train_text_encoders"]
    assert cfg["lokr"]["full_matrix"] is True
    assert cfg["model"]["pretrained"] == ""


def test_tiny_changes_only_what_it_lists():
    tiny, eps = load_config("tiny"), load_config("epsilon")
    assert tiny["model"]["pretrained"] == "tiny" and tiny["train"]["mixed_precision"] == "no"
    assert tiny["data"]["resolution"] == 64
    # Not in tiny.toml, so the recipe's values:
    assert tiny["train"]["noise_offset"] == eps["train"]["noise_offset"] == 0.0357
    assert tiny["optimizer"]["betas"] == [0.9, 0.95]


def test_overrides_are_parsed_as_toml_values():
    cfg = load_config("tiny", ["train.batch_size=3", "data.random_crop=true",
                               "optimizer.betas=[0.8, 0.9]", "model.pretrained=/models/sdxl.safetensors",
                               "optimizer.lr_unet=1"])
    assert cfg["train"]["batch_size"] == 3
    assert cfg["data"]["random_crop"] is True
    assert cfg["optimizer"]["betas"] == [0.8, 0.9]
    assert cfg["model"]["pretrained"] == "/models/sdxl.safetensors"  # bare text is a string
    assert cfg["optimizer"]["lr_unet"] == 1.0 and isinstance(cfg["optimizer"]["lr_unet"], float)


def test_user_toml_file_layers_on_epsilon(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[train]\nbatch_size = 2\n[lokr.factors]\nAttention = 8\n')
    cfg = load_config(str(path))
    assert cfg["train"]["batch_size"] == 2 and cfg["lokr"]["factors"]["Attention"] == 8
    assert cfg["train"]["grad_accum"] == 16  # from the recipe
    path.write_text('[trian]\nbatch_size = 2\n')
    with pytest.raises(HakubooruError, match=r"unknown config key 'trian.batch_size'"):
        load_config(str(path))
    path.write_text('[train\n')
    with pytest.raises(HakubooruError, match="not valid TOML"):
        load_config(str(path))
    with pytest.raises(HakubooruError, match="unknown config 'nope'"):
        load_config("nope")


@pytest.mark.parametrize("override, message", [
    ("train.bach_size=2", "unknown config key 'train.bach_size' (did you mean 'train.batch_size'?)"),
    ("train.batch_size=0", "'train.batch_size' must be ≥ 1 (got 0)"),
    ("train.batch_size=2.5", "'train.batch_size' must be int"),
    ("train.mixed_precision=fp8", "'train.mixed_precision' must be one of fp16, bf16, no"),
    ("optimizer.lr_unet=0", "'optimizer.lr_unet' must be > 0"),
    ("optimizer.betas=[0.9]", "'optimizer.betas' must be two numbers"),
    ("data.tag_dropout=1.0", "'data.tag_dropout' must be < 1"),
    ("data.resolution=100", "multiple of 8"),
    ("data.bucket_min=2048", "data.bucket_min ≤ data.resolution ≤ data.bucket_max"),
    ("train.gradient_checkpointing=1", "must be bool"),
    ("lokr.factors.Attention=0", "'lokr.factors.Attention' must be an integer ≥ 1"),
    ("lokr.factors.Attention=-1", "'lokr.factors.Attention' must be an integer ≥ 1"),
    ("optimizer.lr_unet=nan", "'optimizer.lr_unet' must be a finite float, got nan"),
    ("train.noise_offset=inf", "'train.noise_offset' must be a finite float, got inf"),
    ("optimizer.betas=[0.9, nan]", "'optimizer.betas' must be two numbers"),
    ("lokr.factors.Conv=4", "unknown config key 'lokr.factors.Conv'"),
    ("train", "--set expects section.key=value"),
    ("train.seed=-1", "'train.seed' must be ≥ 0 (got -1)"),
    ("train.seed=18446744073709551616", "'train.seed' must be < 2**64 (got 18446744073709551616)"),
    ("data.on_corrupt=ignore", "'data.on_corrupt' must be one of error, skip (got 'ignore')"),
])
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(HakubooruError) as err:
        load_config("epsilon", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_largest_seed_is_accepted():
    assert load_config("epsilon", [("train.seed", 2**64 - 1)])["train"]["seed"] == 2**64 - 1


def test_cli_errors_are_one_line(capsys, tmp_path):
    # epsilon has no base model: the message says what to pass.
    assert main(["--shards", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no base model: pass --pretrained PATH") and "\n" not in err
    assert main(["--config", "tiny", "--set", "train.seeed=1", "--shards", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --set: unknown config key 'train.seeed' (did you mean 'train.seed'?)"
    assert main(["--config", "tiny"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no data: pass --shards DIR")


def test_resume_config_rules():
    saved = load_config("tiny")
    # workers never change a result: accepted without a flag, and not part of the fingerprint
    assert check_resume_config(saved, load_config("tiny", ["data.workers=3"]), False) == ["data.workers"]
    assert config_fingerprint(load_config("tiny", ["data.workers=3"])) == config_fingerprint(saved)
    # more steps: only with the flag
    longer = load_config("tiny", ["train.max_steps=50"])
    with pytest.raises(HakubooruError, match="--allow-config-change"):
        check_resume_config(saved, longer, False)
    assert check_resume_config(saved, longer, True) == ["train.max_steps"]
    # a changed learning rate changes the run: refused even with the flag
    with pytest.raises(HakubooruError, match=r"another config \(optimizer.lr_unet: 0.001 -> 0.002\)"):
        check_resume_config(saved, load_config("tiny", ["optimizer.lr_unet=0.002"]), True)
