"""A tiny v-prediction, zero-terminal-SNR base end to end: the run says what it found, trains
against v with finite losses, renders samples on the same schedule, marks its LoKr, and a merge
carries the base's v_pred / ztsnr keys (single file) or scheduler config (folder)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.network.merge import main as merge_main
from trainers.lokr.sdxl.model import load_sdxl, save_sdxl, tiny_sdxl, training_scheduler
from trainers.lokr.sdxl.prediction import V_PREDICTION, Prediction, detect
from trainers.lokr.train import setup, train


@pytest.fixture(scope="module")
def vpred_base(tmp_path_factory):
    """A diffusers folder whose scheduler says v_prediction with rescaled betas (as NoobAI's)."""
    base = tmp_path_factory.mktemp("vpred") / "base"
    sdxl = tiny_sdxl(seed=0)
    sdxl.noise_scheduler = training_scheduler(prediction=Prediction(V_PREDICTION, True))
    save_sdxl(sdxl, base)
    config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    return base


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("vpred_shards"), n=16).dir


def test_a_vpred_base_trains_against_v_and_says_so(vpred_base, shards, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(load_config("tiny", [f"model.pretrained={vpred_base}", "train.max_steps=3",
                                         "sample.every=3", "sample.steps=3"]), shards, out)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"base model: v_prediction, zero-terminal SNR (from "
                                   f"{vpred_base / 'scheduler' / 'scheduler_config.json'})")
    assert summary["step"] == 3 and summary["skipped"] == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] is not None for x in lines) and lines[-1]["sample_sheet"]
    with safe_open(out / "lokr.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_zero_terminal_snr"] == "True"

    single, folder = tmp_path / "merged.safetensors", tmp_path / "merged"
    assert merge_main(["--pretrained", str(vpred_base), "--lokr", str(out / "lokr.safetensors"),
                       "--out", str(single)]) == 0
    with safe_open(single, "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys()) and f.metadata()["modelspec.prediction_type"] == "v"
    found = detect(str(single))
    assert (found.type, found.zero_terminal_snr) == (V_PREDICTION, True)
    assert merge_main(["--pretrained", str(vpred_base), "--lokr", str(out / "lokr.safetensors"),
                       "--out", str(folder)]) == 0
    reloaded = load_sdxl(folder).noise_scheduler
    assert reloaded.config.prediction_type == V_PREDICTION and reloaded.alphas_cumprod[-1].item() == 0.0


def test_the_run_schedule_follows_the_base_or_the_config(vpred_base, shards, tmp_path, capsys):
    run = setup(load_config("tiny", [f"model.pretrained={vpred_base}"]), shards, tmp_path / "a")
    sched = run.sdxl.noise_scheduler
    assert sched.config.prediction_type == V_PREDICTION and sched.alphas_cumprod[-1].item() == 0.0
    run = setup(load_config("tiny", [f"model.pretrained={vpred_base}", "model.zero_terminal_snr=false"]),
                shards, tmp_path / "b")
    assert run.sdxl.noise_scheduler.alphas_cumprod[-1].item() > 0.004  # SDXL's own terminal ᾱ
    err = capsys.readouterr().err
    assert sum(ln.startswith("warning: model.zero_terminal_snr = false contradicts the base")
               for ln in err.splitlines()) == 1
    run = setup(load_config("tiny"), shards, tmp_path / "c")
    assert run.sdxl.noise_scheduler.config.prediction_type == "epsilon"
    assert torch.equal(run.sdxl.noise_scheduler.alphas_cumprod, training_scheduler().alphas_cumprod)
    assert "base model: epsilon, SDXL's schedule (terminal SNR > 0) (from the built-in tiny model)" in \
        capsys.readouterr().err
