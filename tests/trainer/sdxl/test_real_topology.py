"""The real SDXL path on a narrow real-topology SDXL (every block, layer count and module
name of SDXL base 1.0, channels cut down), through the public commands in fresh processes:
`python -m trainers.lokr.sdxl.fake` writes a diffusers folder (fp32 + fp16 variant files) and
an original-layout single file; two optimizer steps train from each (two loaders, the same
weights and data: identical LoKrs); `merge` folds the LoKr into the single file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import REPO, FIXTURES
from tests.helpers.shards import make_test_shards
from trainers.lokr.sdxl.fake import single_file_state
from trainers.lokr.sdxl.model import load_sdxl, sdxl_on_meta
from trainers.lokr.network.lokr import load_lokr

KEYS = FIXTURES / "sdxl_base_1.0_keys.txt"  # the published file's names and shapes


def sdxl_keys() -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the published SDXL base 1.0 single file."""
    out = {}
    for line in KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split()
            out[name] = tuple(int(d) for d in shape.split("x")) if shape not in ("", "scalar") else ()
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("narrow")
    done = cli("trainers.lokr.sdxl.fake", "--narrow", "--out", str(tmp / "sdxl"),
               "--single-file", str(tmp / "sdxl.safetensors"))
    assert done.returncode == 0, done.stderr
    # the configs alone (no tokenizers): a single file then uses SDXL's bundled tokenizers
    shutil.copytree(tmp / "sdxl", tmp / "configs", ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    return tmp


def test_real_size_single_file_has_the_published_names_and_shapes():
    state = single_file_state(sdxl_on_meta())
    assert {k: tuple(v.shape) for k, v in state.items()} == sdxl_keys()


@pytest.mark.slow
def test_narrow_files_have_sdxl_names_and_the_published_folder_layout(narrow):
    with safe_open(str(narrow / "sdxl.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sdxl_keys())
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() == [32, 4, 3, 3]
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model"), ("text_encoder_2", "model")):
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            assert (narrow / "sdxl" / sub / name).is_file()
    assert (narrow / "sdxl" / "tokenizer" / "vocab.json").is_file()


@pytest.mark.slow
def test_folder_and_single_file_load_the_same_weights_and_tokenizers(narrow):
    folder = load_sdxl(narrow / "sdxl", dtype=torch.bfloat16)  # reads the fp16 variant files
    single = load_sdxl(narrow / "sdxl.safetensors", dtype=torch.bfloat16, config=narrow / "configs")
    for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert folder.vae.dtype == single.vae.dtype == torch.float32  # the VAE as stored
    assert single.unet.dtype == torch.bfloat16
    # SDXL's real tokenizer (hand-checked ids), bundled; text encoder 2 pads with "!"
    assert single.tokenizer_1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert single.tokenizer_2.pad_token == "!" and folder.tokenizer_2.pad_token == "!"


@pytest.mark.slow
def test_train_from_folder_and_file_give_identical_lokrs_then_merge(narrow, tmp_path):
    shards = make_test_shards(tmp_path / "shards", n=16).dir
    runs = {}
    for name, pretrained, extra in (("folder", narrow / "sdxl", []),
                                    ("file", narrow / "sdxl.safetensors", ["--set", f"model.config={narrow / 'configs'}"])):
        done = cli("trainers.lokr", "--config", "tiny", "--shards", str(shards), "--pretrained", str(pretrained),
                   "--output", str(tmp_path / name), "--max-steps", "2", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = load_file(tmp_path / name / "lokr.safetensors")
    assert runs["folder"].keys() == runs["file"].keys()
    assert all(torch.equal(runs["folder"][k], runs["file"][k]) for k in runs["folder"])
    w2 = [v for k, v in runs["file"].items() if k.endswith("lokr_w2")]
    assert any(v.abs().max() > 0 for v in w2)  # trained: LoKr starts with w2 = 0

    merged = tmp_path / "merged.safetensors"
    done = cli("trainers.lokr", "merge", "--pretrained", str(narrow / "sdxl.safetensors"),
               "--model-config", str(narrow / "configs"), "--lokr", str(tmp_path / "file" / "lokr.safetensors"),
               "--out", str(merged), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sd-scripts naming" in done.stderr  # the trainer's default names, read back by merge
    from safetensors import safe_open
    published = set(sdxl_keys())
    with safe_open(str(merged), "pt") as f:
        assert set(f.keys()) == published  # every name of the published file, narrow shapes
    base = load_sdxl(narrow / "sdxl.safetensors", config=narrow / "configs")
    load_lokr(base, tmp_path / "file" / "lokr.safetensors")  # hooked in, as in training
    after = load_sdxl(merged, config=narrow / "configs")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 12, generator=g), torch.tensor([500])
    context, pooled = torch.randn(1, 77, 96, generator=g), torch.randn(1, 64, generator=g)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96]])}
    with torch.no_grad():
        expected = base.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample
        got = after.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample
    # the same delta added in another order of fp32 operations (as tests/trainer/network/test_merge.py)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_vpred_narrow_single_file_trains_with_every_option(narrow, tmp_path):
    """The narrow single file marked as NoobAI's v-pred files are (v_pred, ztsnr keys), trained with
    this issue's options on: v target on the rescaled schedule, cosine, AdamW, caption dropout,
    no-upscale buckets, EMA and validation (issue 20 on the real topology)."""
    import json

    from safetensors.torch import save_file

    tensors = load_file(narrow / "sdxl.safetensors")
    vpred = tmp_path / "vpred.safetensors"
    save_file({**tensors, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, vpred)
    del tensors
    shards = make_test_shards(tmp_path / "shards", n=16, sizes=((48, 48), (64, 64), (96, 64))).dir
    out = tmp_path / "run"
    sets = ["optimizer.name=AdamW", "optimizer.schedule=cosine", "data.caption_dropout=0.5",
            "data.bucket_no_upscale=true", "ema.decay=0.9", "validation.samples=2", "validation.every=1",
            f"model.config={narrow / 'configs'}"]
    done = cli("trainers.lokr", "--config", "tiny", "--shards", str(shards), "--pretrained", str(vpred),
               "--output", str(out), "--max-steps", "2", *[a for s in sets for a in ("--set", s)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "base model: v_prediction, zero-terminal SNR (from vpred.safetensors: v_pred, ztsnr key)" in done.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("val_loss") is not None] == [1, 2]
    assert all(x["loss"] is not None for x in lines)
    with safe_open(str(out / "lokr-ema.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW")
