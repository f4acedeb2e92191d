"""The recipe's LoKr network (Kohaku XL Delta's published LyCORIS config, docs/lokr.md) on the
real SDXL architecture (meta device) and on the tiny model: the exact module set, found by what
each module is on every supported transformers version (scripts/test_transformers_range.sh runs
this file against the lowest and highest allowed), the factors' shapes, and refusals."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from hakubooru.errors import HakubooruError
from trainers.lokr.network import naming, lokr as network_mod
from trainers.lokr.config import load_config
from trainers.lokr.sdxl.model import sdxl_on_meta, tiny_sdxl
from trainers.lokr.network.lokr import create_lokr, lokr_targets
from tests.helpers import FIXTURES

KEYS = FIXTURES / "sdxl_base_1.0_keys.txt"  # the published file's names and shapes


@pytest.fixture(scope="module")
def epsilon_on_meta():
    sdxl = sdxl_on_meta()
    with torch.device("meta"):
        network = create_lokr(sdxl, load_config("epsilon")["lokr"])
    return sdxl, network


def test_epsilon_network_per_group_counted_by_hand(epsilon_on_meta):
    sdxl, network = epsilon_on_meta
    groups = Counter(lokr_targets(sdxl, load_config("epsilon")["lokr"]).values())
    # SDXL base: 70 BasicTransformerBlocks (down 2 x 2 layers + 2 x 10, mid 10, up 3 x 10 + 3 x 2),
    # each attn1 + attn2 (4 Linear) and a
    # feed-forward (GEGLU proj, out), and with train_norm its 3 LayerNorms; 11 Transformer2DModels,
    # each norm (GroupNorm), proj_in, proj_out; 17 resnets (down 6, mid 2, up 9), each norm1, conv1,
    # time_emb_proj, norm2, conv2, and a conv_shortcut where channels change (down 1.0, down 2.0 and
    # all 9 up resnets: 11); 2 downsamplers, 2 upsamplers; conv_in, conv_norm_out, conv_out;
    # time_embedding and add_embedding, 2 Linear each. Text encoders: 12 and 32 layers, each
    # q, k, v, out_proj and fc1, fc2.
    assert groups == {
        ("unet", "Attention"): 70 * 2 * 4, ("unet", "FeedForward"): 70 * 2,
        ("unet", "Transformer2DModel"): 11 * 3 + 70 * 3, ("unet", "ResnetBlock2D"): 17 * 5 + 11,
        ("unet", "Downsample2D"): 2, ("unet", "Upsample2D"): 2, ("unet", "conv_in_out"): 3,
        ("unet", "embeddings"): 4,
        ("te1", "CLIPAttention"): 12 * 4, ("te1", "CLIPMLP"): 12 * 2,
        ("te2", "CLIPAttention"): 32 * 4, ("te2", "CLIPMLP"): 32 * 2}
    assert len(network.loras) == sum(groups.values()) == 1314


def test_epsilon_module_set_is_every_unet_weight_and_the_clip_projections(epsilon_on_meta):
    """Derived without the code under test: the recipe's preset reaches every Linear, Conv and
    norm of the UNet, i.e. one module per `model.diffusion_model.*.weight` of the published
    file; in the text encoders, q/k/v/out and fc1/fc2 of every layer, written out by hand."""
    sdxl, network = epsilon_on_meta
    published = [line.split()[0] for line in KEYS.read_text().splitlines() if line and not line.startswith("#")]
    want = {"lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
            for k in published if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    for te, layers in (("te1", 12), ("te2", 32)):
        for n in range(layers):
            want |= {f"lora_{te}_text_model_encoder_layers_{n}_self_attn_{p}_proj" for p in "qkv"}
            want |= {f"lora_{te}_text_model_encoder_layers_{n}_self_attn_out_proj",
                     f"lora_{te}_text_model_encoder_layers_{n}_mlp_fc1",
                     f"lora_{te}_text_model_encoder_layers_{n}_mlp_fc2"}
    names = naming.unet_names(sdxl.unet)
    got = [names.get(lora.lora_name, lora.lora_name) for lora in network.loras]  # sd-scripts naming
    assert len(got) == len(set(got)) and set(got) == want


def test_epsilon_lokr_file_is_the_published_size(epsilon_on_meta):
    """Kohaku XL Delta's LoKr files are 783 MB (fp16): ours within 5 % of that and under the
    recipe's 800 MB. Counted from the shapes: w1 ⊗ w2 per LoKr module, w_norm + b_norm per norm."""
    _, network = epsilon_on_meta
    values = sum(v.numel() for lora in network.loras for v in lora.state_dict().values())
    assert 0.95 * 783e6 <= 2 * values < 800e6


def test_text_attention_is_found_by_what_it_is_not_its_class_name():
    """transformers 4.43–4.51 call CLIP's attention CLIPSdpaAttention: a class name the LoKr has
    never seen still gets wrapped, because the module has q/k/v/out projections."""
    sdxl = tiny_sdxl()
    for te in (sdxl.text_encoder_1, sdxl.text_encoder_2):
        for module in te.modules():
            if hasattr(module, "q_proj"):
                module.__class__ = type("SomeFutureAttention", (type(module),), {})
    net = create_lokr(sdxl, load_config("tiny")["lokr"])
    # tiny text encoders: 3 layers x (q, k, v, out_proj, fc1, fc2) each
    assert len(net.text_encoder_loras) == 2 * 3 * 6
    assert "lora_te2_text_model_encoder_layers_2_self_attn_v_proj" in {lora.lora_name for lora in net.loras}


def test_a_group_that_wraps_fewer_modules_than_it_names_is_refused(monkeypatch):
    """As when LyCORIS matched no CLIPSdpaAttention: one line naming the group, not a silent
    network with less in it."""
    real = network_mod.lokr_preset

    def without_text_attention(sdxl, cfg, **kw):
        preset = real(sdxl, cfg, **kw)
        preset["text_encoder_target_module"] = ["CLIPMLP"]
        return preset

    monkeypatch.setattr(network_mod, "lokr_preset", without_text_attention)
    with pytest.raises(HakubooruError, match=r"LoKr group CLIPAttention \(te1\) wraps 0 of the 12 modules it names, "
                                             r"e\.g\. not lora_te1_text_model_encoder_layers_0_self_attn_k_proj"):
        create_lokr(tiny_sdxl(), load_config("tiny")["lokr"])


def test_new_groups_factor_shapes_by_hand():
    """LyCORIS's factorization(dim, f): (f, dim / f) smaller first when f divides dim, else the
    most balanced divisor pair with its first part ≤ f; w1 = (out_a, in_a), w2 = (out_b, in_b, k, k)."""
    net = create_lokr(tiny_sdxl(), load_config("tiny")["lokr"])
    by_name = {lora.lora_name: lora for lora in net.loras}
    # conv_in 4 -> 32, 3x3, factor 8: 32 = 8 x 4 -> (4, 8); 4 is not divisible by 8 -> (2, 2)
    lora = by_name["lora_unet_conv_in"]
    assert lora.lokr_w1.shape == (4, 2) and lora.lokr_w2.shape == (8, 2, 3, 3)
    # a norm (train_norm): an offset per channel for weight and bias, starting at zero
    norm = by_name["lora_unet_down_blocks_0_resnets_0_norm1"]
    assert norm.w_norm.shape == norm.b_norm.shape == (32,) and not norm.w_norm.any()
    # FeedForward, tiny factor 2: the mid block's out Linear 4 x 64 -> 64: out 64 = 2 x 32, in 256 = 2 x 128
    lora = by_name["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"]
    assert lora.lokr_w1.shape == (2, 2) and lora.lokr_w2.shape == (32, 128)


def test_a_factor_of_0_leaves_a_group_out_and_old_states_resume_with_the_old_network():
    """The network before the recipe's groups (our earlier guess): the new groups at 0 and no
    norm offsets give its 1026 modules; a state written then (no train_norm, no new groups in its
    config) resumes under exactly that config instead of being refused."""
    from trainers.lokr.config import check_resume_config

    old_network = [("lokr.factors.FeedForward", 4), ("lokr.factors.ResnetBlock2D", 8),
                   ("lokr.factors.CLIPAttention", 2), ("lokr.factors.CLIPMLP", 4), ("lokr.train_norm", False)] + [
        (f"lokr.factors.{g}", 0) for g in ("Transformer2DModel", "Downsample2D", "Upsample2D", "conv_in_out",
                                           "embeddings")]
    cfg = load_config("epsilon", old_network)
    sdxl = sdxl_on_meta()
    with torch.device("meta"):
        assert len(create_lokr(sdxl, cfg["lokr"]).loras) == 560 + 140 + 62 + 72 + 192
    saved = load_config("epsilon", old_network)
    del saved["lokr"]["train_norm"]
    saved["lokr"]["factors"] = {"Attention": 4, "FeedForward": 4, "ResnetBlock2D": 8, "CLIPAttention": 2, "CLIPMLP": 4}
    assert check_resume_config(saved, cfg, allow_change=False) == []
    with pytest.raises(HakubooruError, match=r"lokr.train_norm: False -> True"):
        check_resume_config(saved, load_config("epsilon"), allow_change=False)
