"""SDXL models: the tiny model, offline loading (diffusers folder and single file), the
real architecture on the meta device."""
import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open

from hakubooru.errors import HakubooruError
from trainers.lokr.sdxl.model import (base_model_hash, load_sdxl, save_sdxl, save_sdxl_single_file, sdxl_on_meta,
                                  tiny_sdxl)
from trainers.lokr.sdxl.text import encode_prompts

COMPONENTS = ("unet", "vae", "text_encoder_1", "text_encoder_2")


@pytest.fixture
def offline(monkeypatch):
    """No hub: both the environment switch and huggingface_hub's already-read constant."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "sdxl"
    save_sdxl(tiny_sdxl(seed=3), folder)
    return folder


def assert_same_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_tiny_has_the_sdxl_wiring():
    sdxl = tiny_sdxl(seed=0)
    cfg = sdxl.unet.config
    assert cfg.addition_embed_type == "text_time"
    # cross-attention reads both encoders' hidden states side by side: 32 + 64
    assert cfg.cross_attention_dim == sdxl.text_encoder_1.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    # added conditioning: 6 time ids x addition_time_embed_dim, then the pooled projection
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + 64
    assert sdxl.text_encoder_2.config.projection_dim == 64
    assert sdxl.vae.config.scaling_factor == 0.13025
    # VAE: 4 levels, 3 downsamplings -> 64 px become 8 latent px, as SDXL's 1024 -> 128
    with torch.no_grad():
        latents = sdxl.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    # training schedule: DDPM, scaled-linear betas from 0.00085 to 0.012 over 1000 steps
    betas = sdxl.noise_scheduler.betas
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-5) and betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    # scaled linear: sqrt(beta) is linear in t, so its midpoint is the mean of the ends' roots
    assert betas[0].sqrt().item() + betas[-1].sqrt().item() == pytest.approx(
        betas[499].sqrt().item() + betas[500].sqrt().item(), rel=1e-5)
    assert sdxl.noise_scheduler.config.prediction_type == "epsilon"


def test_tiny_unet_transformer_layers():
    """The tiny UNet's transformer blocks per attention block (the counts test_network's LoKr
    module count is derived from): down 1: 1, down 2: 2, mid: 2; up blocks mirror the down
    ones with one more resnet, so up 0 has 2 attentions x 2 layers, up 1 2 x 1."""
    unet = tiny_sdxl(seed=0).unet
    layers = lambda block: [len(a.transformer_blocks) for a in getattr(block, "attentions", [])]
    assert [layers(b) for b in unet.down_blocks] == [[], [1], [2]]
    assert layers(unet.mid_block) == [2]
    assert [layers(b) for b in unet.up_blocks] == [[2, 2], [1, 1], []]


def test_tiny_default_seed_is_zero():
    """tiny_sdxl() is tiny_sdxl(seed=0), the model `--pretrained tiny` trains, merges and
    converts on (train.py, merge.py, convert.py pass seed=0)."""
    assert_same_weights(tiny_sdxl(), tiny_sdxl(seed=0))


def test_tiny_is_deterministic_in_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_sdxl(seed=1), tiny_sdxl(seed=1), tiny_sdxl(seed=2)
    assert torch.equal(torch.rand(3), expected_next)
    assert_same_weights(a, b)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_diffusers_folder_round_trip(tiny_folder, offline):
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_folder / sub).is_dir()
    assert json.loads((tiny_folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    # weights as safetensors, one file per component (the layout loading.py reads tensor by
    # tensor, docs/lokr.md), no pickled .bin
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert len(list((tiny_folder / sub).glob("*.safetensors"))) == 1, sub
        assert not list((tiny_folder / sub).glob("*.bin")), sub
    loaded = load_sdxl(tiny_folder)
    assert_same_weights(tiny_sdxl(seed=3), loaded)
    captions = ["1girl, solo, smile", "no humans, scenery"]
    ref = tiny_sdxl(seed=3)
    with torch.no_grad():
        for x, y in zip(encode_prompts(ref, captions), encode_prompts(loaded, captions)):
            assert torch.equal(x, y)
    half = load_sdxl(tiny_folder, dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16


def test_single_file_round_trip(tiny_folder, tmp_path, offline):
    path = save_sdxl_single_file(tiny_sdxl(seed=3), tmp_path / "tiny.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        in_proj = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    # the original SDXL layout: UNet, VAE, CLIP-L under its transformer, OpenCLIP-G with fused qkv
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys            # conv_in
    assert "model.diffusion_model.label_emb.0.0.weight" in keys               # add_embedding.linear_1
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys      # mid attention
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert in_proj.shape == (3 * 64, 64)  # q, k, v of text encoder 2 (width 64) stacked
    loaded = load_sdxl(path, config=tiny_folder)  # configs + tokenizers of the same architecture
    assert_same_weights(tiny_sdxl(seed=3), loaded)
    # tokenizers may also come from their own folder
    tok_dir = tmp_path / "toks"
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_folder / sub, tok_dir / sub)
    cfg_only = tmp_path / "cfg"
    shutil.copytree(tiny_folder, cfg_only, ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    assert_same_weights(tiny_sdxl(seed=3), load_sdxl(path, config=cfg_only, tokenizers=tok_dir))


def test_missing_pieces_are_clear_errors(tiny_folder, tmp_path, offline):
    with pytest.raises(HakubooruError, match="not found"):
        load_sdxl(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(HakubooruError, match=r"missing unet/config\.json"):
        load_sdxl(broken)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(HakubooruError, match="diffusers folder or a .safetensors"):
        load_sdxl(other)
    path = save_sdxl_single_file(tiny_sdxl(), tmp_path / "tiny.safetensors")
    # the bundled SDXL configs (and SDXL's bundled tokenizers) do not fit the tiny file
    with pytest.raises(HakubooruError, match=r"not an SDXL checkpoint of this architecture: \d+ tensors missing, "
                                             r"e\.g\. model\.diffusion_model\.input_blocks\.2\."):
        load_sdxl(path)
    # a config folder without tokenizers whose text encoders do not use CLIP's vocabulary
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_folder, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(HakubooruError, match="not CLIP's 49408; pass --tokenizers DIR"):
        load_sdxl(path, config=no_tok)
    with pytest.raises(HakubooruError, match="does not exist"):
        load_sdxl(path, config=tmp_path / "nowhere")
    no_te2 = tmp_path / "no_te2"
    shutil.copytree(tiny_folder, no_te2)
    (no_te2 / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(HakubooruError, match=r"lacks text_encoder_2/config\.json"):
        load_sdxl(path, config=no_te2)
    with pytest.raises(HakubooruError, match="already exists"):
        save_sdxl(tiny_sdxl(), tiny_folder)


def test_real_sdxl_architecture_on_meta():
    sdxl = sdxl_on_meta()
    assert sdxl.unet.device.type == "meta"

    def count(model):
        return sum(p.numel() for p in model.parameters())

    # The SDXL 1.0 base UNet has about 2.567 billion parameters.
    assert round(count(sdxl.unet) / 1e9, 3) == 2.567
    # CLIP ViT-L/14 text, by hand: embeddings 49408*768 + 77*768 = 38,004,480; per layer
    # attention 4*(768*768 + 768) = 2,362,368, MLP 768*3072 + 3072 + 3072*768 + 768 = 4,722,432,
    # two layer norms 4*768 = 3,072 -> 7,087,872 x 12 = 85,054,464; final norm 1,536.
    assert count(sdxl.text_encoder_1) == 38_004_480 + 85_054_464 + 1_536
    # OpenCLIP bigG text: embeddings 49408*1280 + 77*1280 = 63,340,800; per layer attention
    # 4*(1280^2 + 1280) = 6,558,720, MLP 2*1280*5120 + 5120 + 1280 = 13,113,600, norms 5,120
    # -> 19,677,440 x 32 = 629,678,080; final norm 2,560; projection 1280*1280 = 1,638,400.
    assert count(sdxl.text_encoder_2) == 63_340_800 + 629_678_080 + 2_560 + 1_638_400
    cfg = sdxl.unet.config
    assert cfg.cross_attention_dim == 768 + 1280
    assert cfg.projection_class_embeddings_input_dim == 6 * 256 + 1280


def test_base_model_hash(tiny_folder, tmp_path):
    import hashlib

    path = save_sdxl_single_file(tiny_sdxl(), tmp_path / "one.safetensors")
    # a single file: the sha256 of its bytes (what sd-webui / civitai show as SHA256)
    assert base_model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    # a folder: a copy hashes the same, one changed byte in any file does not
    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    assert base_model_hash(copy) == base_model_hash(tiny_folder)
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("1000", "1001"))
    assert base_model_hash(copy) != base_model_hash(tiny_folder)
    assert base_model_hash("tiny") == "tiny"
    with pytest.raises(HakubooruError, match="not found"):
        base_model_hash(tmp_path / "nowhere")


def test_folder_without_weights_is_a_clear_error(tiny_folder, tmp_path, offline):
    configs_only = tmp_path / "configs_only"
    shutil.copytree(tiny_folder, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(HakubooruError, match="cannot load the diffusers folder"):
        load_sdxl(configs_only)
