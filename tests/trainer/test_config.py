"""Trainer config: the epsilon recipe, layering, overrides, validation and resume compatibility."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hakubooru.errors import HakubooruError
from trainers.lokr.__main__ import main
from trainers.lokr import config
from trainers.lokr.config import check_resume_config, config_fingerprint, load_config
from tests.helpers import REPO


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
    assert d["shuffle_tags"] is True and d["shuffle_scope"] == "general"  # the card: only general tags move
    assert t["mixed_precision"] == "fp16" and t["gradient_checkpointing"] and t["train_text_encoders"]
    assert t["epochs"] == 1
    assert cfg["lokr"]["full_matrix"] is True
    assert cfg["model"]["pretrained"] == ""
    assert t["ddp_timeout"] == 30 * 60  # torch's default collective timeout, in seconds


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
    ("train.ddp_timeout=0", "'train.ddp_timeout' must be > 0"),
    ("optimizer.betas=[0.9]", "'optimizer.betas' must be two numbers"),
    ("data.tag_dropout=1.0", "'data.tag_dropout' must be < 1"),
    ("data.resolution=100", "multiple of 8"),
    ("data.bucket_min=2048", "data.bucket_min ≤ data.resolution ≤ data.bucket_max"),
    ("train.gradient_checkpointing=1", "must be bool"),
    ("lokr.factors.Attention=-1", "'lokr.factors.Attention' must be an integer ≥ 0, 0 = not wrapped"),
    ("lokr.factors.Attention=2.5", "config key 'lokr.factors.Attention' must be int, got 2.5"),
    ("optimizer.lr_unet=nan", "'optimizer.lr_unet' must be a finite float, got nan"),
    ("train.noise_offset=inf", "'train.noise_offset' must be a finite float, got inf"),
    ("optimizer.betas=[0.9, nan]", "'optimizer.betas' must be two numbers"),
    ("lokr.factors.Conv=4", "unknown config key 'lokr.factors.Conv'"),
    ("train", "--set expects section.key=value"),
    ("train.seed=-1", "'train.seed' must be ≥ 0 (got -1)"),
    ("train.seed=18446744073709551616", "'train.seed' must be < 2**64 (got 18446744073709551616)"),
    ("data.on_corrupt=ignore", "'data.on_corrupt' must be one of error, skip (got 'ignore')"),
    ("data.shuffle_scope=tail", "'data.shuffle_scope' must be one of general, all (got 'tail')"),
    # the key it replaced: one line naming the new one
    ("data.protect_quality_year_rating=true",
     "config key 'data.protect_quality_year_rating' was replaced by data.shuffle_scope"),
    ("train.save_every=0", "'train.save_every' must be ≥ 1 (got 0)"),
    # [sample] holds the defaults of every prompt; [[sample.prompts]] are counted from 1
    ("sample.guidance=-1", "config [sample]: 'guidance' must be a number ≥ 0.0 (got -1.0)"),
    ("sample.width=100", "config [sample]: 'width' must be a multiple of 8 (got 100)"),
    ('sample.prompts=[{prompt = "a"}, {prompt = "b", width = 100}]',
     "config [[sample.prompts]] #2: 'width' must be a multiple of 8 (got 100)"),
    ('sample.prompts=[{prompt = "a", guidance = "high"}]',
     "config [[sample.prompts]] #1: 'guidance' must be a number ≥ 0.0 (got 'high')"),
    ('sample.prompts=[{prompt = "a", steps = 0}]',
     "config [[sample.prompts]] #1: 'steps' must be int ≥ 1 (got 0)"),
])
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(HakubooruError) as err:
        load_config("epsilon", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_largest_seed_is_accepted():
    assert load_config("epsilon", [("train.seed", 2**64 - 1)])["train"]["seed"] == 2**64 - 1


def test_lowest_allowed_values_are_accepted():
    """A state and a checkpoint every step, one state kept: the bounds (≥ 1) themselves are valid."""
    cfg = load_config("epsilon", ["train.save_every=1", "train.keep_states=1", "train.checkpoint_every=1"])
    assert (cfg["train"]["save_every"], cfg["train"]["keep_states"], cfg["train"]["checkpoint_every"]) == (1, 1, 1)


def test_reads_toml_through_tomli_before_python_311(monkeypatch):
    """python_requires is >= 3.10, where the standard library has no tomllib: the config module
    then reads TOML with tomli (the same parser, from PyPI). Simulated here: tomllib made
    unimportable, and tomli provided by the standard library's copy of it."""
    import tomllib
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    spec = importlib.util.spec_from_file_location("config_without_tomllib", config.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.tomllib is tomllib
    assert module.load_config("tiny")["data"]["resolution"] == 64  # tiny.toml's value


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


def test_cli_reads_sys_argv_without_the_program_name(tmp_path):
    """`python -m trainers.lokr --config tiny` (no --shards): the arguments after the program
    name are the command line, so the one-line "no data" error, status 2."""
    root = REPO
    proc = subprocess.run([sys.executable, "-m", "trainers.lokr", "--config", "tiny"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no data: pass --shards DIR")


def test_cli_subcommands_get_the_arguments_after_their_name(capsys, tmp_path):
    """merge, convert and report are dispatched with everything after their name; their own
    one-line errors (status 2) show that they parsed those arguments; a report that is written
    is status 0."""
    missing = tmp_path / "missing.safetensors"
    assert main(["merge", "--pretrained", "tiny", "--lokr", str(missing), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"error: LoKr file not found: {missing}"
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"")
    assert main(["convert", "--lokr", str(missing), "--to", "diffusers", "--out", str(taken)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {taken} already exists; choose a new --out"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "epoch": 0, "loss": 1.0, "lr_unet": 5e-4, "lr_text": 5e-4, "grad_norm": 2.0,
         "images_per_s": 4.0, "skipped": 0}) + "\n")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {run / 'report.html'}: 1 steps (last 1)"
    assert (run / "report.html").is_file()


def test_resume_config_rules():
    saved = load_config("tiny")
    # workers never change a result: accepted without a flag, and not part of the fingerprint
    assert check_resume_config(saved, load_config("tiny", ["data.workers=3"]), False) == ["data.workers"]
    assert config_fingerprint(load_config("tiny", ["data.workers=3"])) == config_fingerprint(saved)
    # so is the collective timeout, and a state written before the key existed resumes
    assert check_resume_config(saved, load_config("tiny", ["train.ddp_timeout=7200"]), False) == ["train.ddp_timeout"]
    before_the_key = load_config("tiny")
    del before_the_key["train"]["ddp_timeout"]
    assert check_resume_config(before_the_key, saved, False) == ["train.ddp_timeout"]
    # more steps: only with the flag
    longer = load_config("tiny", ["train.max_steps=50"])
    with pytest.raises(HakubooruError, match="--allow-config-change"):
        check_resume_config(saved, longer, False)
    assert check_resume_config(saved, longer, True) == ["train.max_steps"]
    # a changed learning rate changes the run: refused even with the flag
    with pytest.raises(HakubooruError, match=r"another config \(optimizer.lr_unet: 0.001 -> 0.002\)"):
        check_resume_config(saved, load_config("tiny", ["optimizer.lr_unet=0.002"]), True)


def test_a_state_from_before_shuffle_scope_is_refused():
    """A state written under data.protect_quality_year_rating moved every tag after the keep
    group: resuming it under the card's rule would change the captions mid-run."""
    now = load_config("tiny")
    before = load_config("tiny")
    del before["data"]["shuffle_scope"]
    before["data"]["protect_quality_year_rating"] = False
    with pytest.raises(HakubooruError, match=r"data.shuffle_scope: 'all' -> 'general'"):
        check_resume_config(before, now, True)
