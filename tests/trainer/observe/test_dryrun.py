"""`--dry-run`: the epsilon LoKr on the real SDXL architecture (meta device) fits 800 MB."""
import os
import sys

import pytest

from trainers.lokr.config import load_config
from trainers.lokr.observe.dryrun import BUDGET_BYTES, dry_run, main
from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.network.lokr import create_lokr, save_lokr

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu_step  # noqa: E402


UNET_ROWS = {("unet", "Attention"): 560, ("unet", "FeedForward"): 140, ("unet", "Transformer2DModel"): 11 * 3 + 70 * 3,
             ("unet", "ResnetBlock2D"): 85 + 11, ("unet", "Downsample2D"): 2, ("unet", "Upsample2D"): 2,
             ("unet", "conv_in_out"): 3, ("unet", "embeddings"): 4}


def test_epsilon_lokr_is_under_800_mb():
    report = dry_run(load_config("epsilon"))
    assert report.save_dtype == "fp16"
    assert report.file_bytes < BUDGET_BYTES == 800_000_000
    rows = {(g.network, g.block): g for g in report.groups}
    # Modules by hand from the SDXL base config (the module set itself: tests/trainer/network/test_recipe_network.py):
    # transformer blocks: down 2 x 2 (640 ch) + 2 x 10 (1280) + mid 10 + up 3 x 10 (1280)
    #   + 3 x 2 (640) = 70; each has attn1 + attn2 (4 Linear each), a FeedForward (2 Linear) and
    #   3 LayerNorms; 11 Transformer2DModels each a GroupNorm, proj_in, proj_out.
    # ResnetBlock2D: 6 down + 2 mid + 9 up = 17, each norm1, conv1, time_emb_proj, norm2, conv2 = 85,
    #   plus conv_shortcut where channels change (first resnet of down 1 and 2, all 9 up) = 11.
    # text encoders: 12 (CLIP-L) and 32 (bigG) layers of q, k, v, out_proj and fc1, fc2.
    assert {k: g.modules for k, g in rows.items()} == UNET_ROWS | {
        ("te1", "CLIPAttention"): 48, ("te1", "CLIPMLP"): 24, ("te2", "CLIPAttention"): 128, ("te2", "CLIPMLP"): 64}
    # LoKr parameters of the UNet's attention at factor f = 4, by hand. A Linear out x in
    # keeps w1 (4 x 4) and w2 (out/4 x in/4). Per transformer block of width c: attn1's four
    # c x c and attn2's to_q, to_out (c x c) -> 6 (c^2/16 + 16); attn2's to_k, to_v read the
    # 2048-wide text states -> 2 (c * 2048/16 + 16). Total 3c^2/8 + 256c + 128:
    #   c = 640:  153,600 + 163,840 + 128 = 317,568, in 10 blocks -> 3,175,680
    #   c = 1280: 614,400 + 327,680 + 128 = 942,208, in 60 blocks -> 56,532,480
    assert rows[("unet", "Attention")].factor == 4
    assert rows[("unet", "Attention")].params == 3_175_680 + 56_532_480
    # three tensors (alpha, lokr_w1, lokr_w2) per LoKr module in the file, two (w_norm, b_norm) per
    # norm: Transformer2DModel 11 + 210 norms and 22 projections, ResnetBlock2D 34 norms and 62 convs
    norms = {"Transformer2DModel": 11 + 70 * 3, "ResnetBlock2D": 17 * 2, "conv_in_out": 1}
    assert all(g.tensors == 3 * g.modules - norms.get(g.block, 0) for g in report.groups)


@pytest.mark.slow
def test_cli_prints_table_and_budget_verdict(capsys):
    assert main(load_config("epsilon")) == 0
    out = capsys.readouterr().out
    assert "unet Attention" in out and "te2 CLIPMLP" in out and "within the recipe's 800 MB budget" in out
    # factor 2 everywhere keeps ~1/4 of every weight: about 1.6 GB in fp16, over budget
    everything_2 = [(f"lokr.factors.{k}", 2) for k in
                    ("Attention", "FeedForward", "ResnetBlock2D", "CLIPAttention", "CLIPMLP")]
    assert main(load_config("epsilon", everything_2)) == 1
    assert "OVER the recipe's 800 MB budget" in capsys.readouterr().out


def test_file_size_estimate_matches_a_saved_file(tmp_path):
    # The same counting on the tiny model, next to the real file written by save_lokr.
    cfg = load_config("epsilon")
    estimate = dry_run(cfg, tiny_sdxl()).file_bytes
    sdxl = tiny_sdxl()
    path = save_lokr(create_lokr(sdxl, cfg["lokr"]), tmp_path / "lokr.safetensors", {"step": "1"}, unet=sdxl.unet)
    # the header (128 bytes a tensor, rounded up) is ~1/4 of this tiny file (~0.05 % at real size)
    assert abs(estimate - os.path.getsize(path)) / os.path.getsize(path) < 0.02


@pytest.mark.slow
def test_gpu_bench_smoke_on_cpu(capsys):
    # The GPU benchmark's code path, run on the CPU with the tiny model: one timed step.
    assert bench_gpu_step.main(["--device", "cpu", "--tiny", "--steps", "1", "--batch", "1", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "tiny SDXL on cpu: batch 1, 64x64" in out
    assert "s/step" in out and "peak RSS" in out


def test_without_text_encoders_only_the_unet_rows():
    """train.train_text_encoders = false: the LoKr wraps the UNet only, so the report has the
    UNet rows (the module counts by hand above) and no te1 / te2 row."""
    report = dry_run(load_config("epsilon", ["train.train_text_encoders=false"]))
    assert {(g.network, g.block): g.modules for g in report.groups} == UNET_ROWS


def test_table_row_shows_the_group_in_mb():
    """A group of 1,000,000 fp16 parameters (2 bytes each; no modules or tensors counted) is
    2,000,000 bytes: 2.0 MB (10^6 bytes) in its row's last column."""
    from trainers.lokr.observe.dryrun import DryRunReport, Group

    report = DryRunReport("fp16", [Group("unet", "Attention", 4, modules=0, params=1_000_000, tensors=0,
                                         values=1_000_000)])
    row = report.table().splitlines()[2]
    assert row.startswith("unet Attention") and row.split()[-1] == "2.0"


def test_the_training_options_default_to_the_recipe(capsys):
    from trainers.lokr.observe.dryrun import option_lines

    lines = option_lines(load_config("epsilon"))
    assert lines[0] == "training options (the recipe's unless marked):" and len(lines) == 11
    assert not any("not the recipe" in ln for ln in lines)
    assert "  model.prediction_type     'auto'" in lines and "  ema.decay                 0.0" in lines
    changed = option_lines(load_config("epsilon", ["optimizer.schedule=cosine", "ema.decay=0.999"]))
    assert [ln.split()[0] for ln in changed if "not the recipe" in ln] == ["optimizer.schedule", "ema.decay"]
