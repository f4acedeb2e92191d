"""The LyCORIS LoKr on the tiny SDXL: coverage, names, factors, no-op start, saving."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hakubooru.errors import HakubooruError
from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.network.lokr import (create_lokr, init_from_lokr, load_lokr, lokr_param_groups, lokr_state_dict,
                                   save_lokr)

FACTORS = {"Attention": 4, "FeedForward": 4, "ResnetBlock2D": 8, "CLIPAttention": 2, "CLIPMLP": 4}
CFG = {"full_matrix": True, "save_dtype": "fp16", "factors": FACTORS}


def unet_inputs(sdxl, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 77, 96, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})


def targets(root, classes=(), children=()):
    """Every Linear / Conv2d inside a module of one of `classes`, or having every one of the
    child names `children` (CLIP's attention and MLP): what the LoKr must wrap."""
    found = set()
    for module in root.modules():
        names = dict(module.named_children())
        if type(module).__name__ in classes or (children and all(c in names for c in children)):
            found |= {id(m) for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return found


def text_targets(sdxl):
    return {i for te in (sdxl.text_encoder_1, sdxl.text_encoder_2)
            for i in targets(te, children=("q_proj", "k_proj", "v_proj", "out_proj")) | targets(te, children=("fc1", "fc2"))}


def test_every_intended_module_wrapped_exactly_once():
    sdxl = tiny_sdxl()
    net = create_lokr(sdxl, CFG)
    wrapped = [id(lora.org_module[0]) for lora in net.unet_loras]
    assert len(wrapped) == len(set(wrapped))
    assert set(wrapped) == targets(sdxl.unet, ("Attention", "FeedForward", "ResnetBlock2D"))
    te = [id(lora.org_module[0]) for lora in net.text_encoder_loras]
    assert len(te) == len(set(te))
    assert set(te) == text_targets(sdxl)
    # Counted by hand from tiny_sdxl's config:
    # transformer blocks: down 1 (1 attn x 1 layer) + down 2 (1 x 2) + mid (1 x 2)
    #   + up 0 (2 attns x 2 layers) + up 1 (2 x 1) = 11; each has attn1 + attn2 (4 Linear each)
    #   -> 88 Attention LoKrs, and one FeedForward (GEGLU proj + out Linear) -> 22.
    # ResnetBlock2D: 3 down + 2 mid + 6 up = 11, each conv1, conv2, time_emb_proj -> 33, plus a
    #   conv_shortcut where channels change: down block 1 (32->64) and all 6 up resnets -> 7.
    assert len(net.unet_loras) == 88 + 22 + 40
    # text encoders: 3 layers x (q, k, v, out_proj + fc1, fc2) = 18 each
    assert len(net.text_encoder_loras) == 36


def test_names_are_kohya_style():
    net = create_lokr(tiny_sdxl(), CFG)
    names = {lora.lora_name for lora in net.loras}
    assert all(n.startswith("lora_unet_") for n in (lora.lora_name for lora in net.unet_loras))
    te = [lora.lora_name for lora in net.text_encoder_loras]
    assert sum(n.startswith("lora_te1_text_model_encoder_layers_") for n in te) == 18
    assert sum(n.startswith("lora_te2_text_model_encoder_layers_") for n in te) == 18
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert "lora_te1_text_model_encoder_layers_2_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in names


def test_factor_per_module_type():
    net = create_lokr(tiny_sdxl(), CFG)
    by_name = {lora.lora_name: lora for lora in net.loras}
    # Attention, factor 4, 64 -> 64 Linear: 64 = 4 x 16 -> w1 (4, 4), w2 (16, 16)
    lora = by_name["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert lora.lokr_w1.shape == (4, 4) and lora.lokr_w2.shape == (16, 16)
    # ResnetBlock2D, factor 8, 3x3 conv 32 -> 32: 32 = 4 x 8 (smaller first) -> w1 (4, 4), w2 (8, 8, 3, 3)
    lora = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert lora.lokr_w1.shape == (4, 4) and lora.lokr_w2.shape == (8, 8, 3, 3)
    # CLIPAttention, factor 2, text encoder 2's 64 -> 64: 64 = 2 x 32 -> w1 (2, 2), w2 (32, 32)
    lora = by_name["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    assert lora.lokr_w1.shape == (2, 2) and lora.lokr_w2.shape == (32, 32)
    # CLIPMLP, factor 4, text encoder 1's fc1 32 -> 64: out 64 = 4 x 16, in 32 = 4 x 8
    lora = by_name["lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert lora.lokr_w1.shape == (4, 4) and lora.lokr_w2.shape == (16, 8)
    assert all(lora.scale == 1 for lora in net.loras)


def test_starts_as_exact_noop():
    sdxl = tiny_sdxl()
    with torch.no_grad():
        before = sdxl.unet(**unet_inputs(sdxl)).sample
        ids = torch.tensor([[512, 70, 80, 513] + [513] * 73])
        te_before = sdxl.text_encoder_2(ids).text_embeds
    create_lokr(sdxl, CFG)
    with torch.no_grad():
        after = sdxl.unet(**unet_inputs(sdxl)).sample
        te_after = sdxl.text_encoder_2(ids).text_embeds
    assert torch.equal(before, after)
    assert torch.equal(te_before, te_after)


def test_trainable_and_param_groups():
    sdxl = tiny_sdxl()
    net = create_lokr(sdxl, CFG)
    groups = lokr_param_groups(net, lr_unet=2e-5, lr_text=5e-6, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("text", 5e-6, 0.1), ("unet", 2e-5, 0.1)]
    # two trainable tensors (lokr_w1, lokr_w2) per module
    assert len(groups[0]["params"]) == 2 * 36 and len(groups[1]["params"]) == 2 * 150
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    # gradients reach the LoKr (w1 gets one only once w2 is non-zero: w2 starts at zero)
    with torch.no_grad():
        for lora in net.loras:
            lora.lokr_w2.normal_(std=0.01)
    sdxl.unet(**unet_inputs(sdxl)).sample.square().mean().backward()
    assert all(lora.lokr_w1.grad is not None and lora.lokr_w1.grad.abs().sum() > 0 for lora in net.unet_loras)
    no_text = create_lokr(tiny_sdxl(), CFG, text_encoders=False)
    assert [g["name"] for g in lokr_param_groups(no_text, 1e-4, 1e-5, 0.0)] == ["unet"]


def test_saved_file_keys_alpha_metadata(tmp_path):
    sdxl = tiny_sdxl()
    net = create_lokr(sdxl, CFG)
    with torch.no_grad():
        for lora in net.loras:
            lora.lokr_w2.normal_(std=0.01)
    path = save_lokr(net, tmp_path / "lokr.safetensors", {"step": 12, "config": {"a": 1}, "base_model": "abc"},
                     unet=sdxl.unet)
    weights = load_file(path)
    modules = {}
    for key in weights:
        name, _, leaf = key.partition(".")
        modules.setdefault(name, set()).add(leaf)
    assert len(modules) == 186
    assert all(leaves == {"alpha", "lokr_w1", "lokr_w2"} for leaves in modules.values())
    assert all(v.dtype == torch.float16 for v in weights.values())
    # full matrix: alpha is stored as the dim (10000, exact in fp16), so scale = alpha / dim = 1
    assert {float(weights[f"{n}.alpha"]) for n in modules} == {10000.0}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "12" and meta["config"] == '{"a": 1}' and meta["base_model"] == "abc"
    # LyCORIS's own loader reads it back with scale 1
    loaded = load_lokr(tiny_sdxl(), path)
    assert len(loaded.unet_loras) == 150 and len(loaded.text_encoder_loras) == 36
    assert all(lora.scale == 1 for lora in loaded.unet_loras + loaded.text_encoder_loras)
    # fp32 save and fp32 state dict keep the weights exactly
    exact = load_file(save_lokr(net, tmp_path / "fp32.safetensors", {}, unet=sdxl.unet, dtype="fp32",
                                naming="diffusers"))
    state = lokr_state_dict(net)
    assert set(exact) == set(state) and all(torch.equal(exact[k], state[k]) for k in state)
    # alpha is the dim itself, 10000 (docs/lokr.md), also where fp32 would keep any other value
    assert {float(v) for k, v in exact.items() if k.endswith(".alpha")} == {10000.0}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(HakubooruError, match="unknown LoKr factor"):
        create_lokr(tiny_sdxl(), {"factors": {**FACTORS, "Attn": 4}})
    with pytest.raises(HakubooruError, match="names no module group"):
        create_lokr(tiny_sdxl(), {"factors": {}})
    with pytest.raises(HakubooruError, match="names no module group"):
        create_lokr(tiny_sdxl(), {"factors": {k: 0 for k in FACTORS}})
    with pytest.raises(HakubooruError, match="positive integer"):
        create_lokr(tiny_sdxl(), {"factors": {**FACTORS, "CLIPMLP": -1}})
    for bad in (True, 2.5):  # a bool or a float is not a factor, though True == 1 and 2.5 > 1
        with pytest.raises(HakubooruError, match=f"CLIPMLP = {bad!r}: a factor must be a positive integer"):
            create_lokr(tiny_sdxl(), {"factors": {**FACTORS, "CLIPMLP": bad}})
    with pytest.raises(HakubooruError, match="full_matrix"):
        create_lokr(tiny_sdxl(), {"full_matrix": False, "factors": FACTORS})
    sdxl = tiny_sdxl()
    net = create_lokr(sdxl, CFG)
    with pytest.raises(HakubooruError, match="save dtype"):
        save_lokr(net, tmp_path / "x.safetensors", {}, unet=sdxl.unet, dtype="int8")
    with pytest.raises(HakubooruError, match="lokr.naming"):
        save_lokr(net, tmp_path / "x.safetensors", {}, unet=sdxl.unet, naming="kohya")
    with pytest.raises(HakubooruError, match="not found"):
        load_lokr(tiny_sdxl(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HakubooruError, match="cannot read"):
        load_lokr(tiny_sdxl(), tmp_path / "junk.safetensors")
    # a module this model does not have (a LoKr for another architecture)
    weights = load_file(save_lokr(net, tmp_path / "ok.safetensors", {}, unet=sdxl.unet))
    weights["lora_unet_input_blocks_99_1_proj_in.alpha"] = torch.tensor(1.0)
    weights["lora_unet_input_blocks_99_1_proj_in.lokr_w1"] = torch.ones(2, 2)
    weights["lora_unet_input_blocks_99_1_proj_in.lokr_w2"] = torch.ones(2, 2)
    save_file(weights, str(tmp_path / "other.safetensors"))
    with pytest.raises(HakubooruError, match="1 of its 187 LoKr modules match no module of this model, "
                                             "e.g. lora_unet_input_blocks_99_1_proj_in"):
        load_lokr(tiny_sdxl(), tmp_path / "other.safetensors")


def test_damaged_file_is_one_clear_error(tmp_path):
    """A LoKr file whose module lost its lokr_w2 (or its alpha) is refused in one line naming
    the file, not with a traceback from inside LyCORIS."""
    sdxl = tiny_sdxl()
    weights = load_file(save_lokr(create_lokr(sdxl, CFG), tmp_path / "ok.safetensors", {}, unet=sdxl.unet))
    for leaf in ("lokr_w2", "alpha"):
        damaged = dict(weights)
        del damaged[f"lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.{leaf}"]
        save_file(damaged, str(tmp_path / "damaged.safetensors"))
        with pytest.raises(HakubooruError) as err:
            load_lokr(tiny_sdxl(), tmp_path / "damaged.safetensors")
        assert str(err.value).startswith(f"cannot load LoKr file {tmp_path / 'damaged.safetensors'}: ")
        assert "\n" not in str(err.value)


def test_init_from_lokr_takes_every_weight_of_the_file(tmp_path):
    """--init-lokr: a new network gets the saved fp32 LoKr's weights exactly; a file made with
    other factors is refused, naming the tensor and both shapes."""
    sdxl = tiny_sdxl()
    net = create_lokr(sdxl, CFG)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras:
            lora.lokr_w1.copy_(torch.randn(lora.lokr_w1.shape, generator=g))
            lora.lokr_w2.copy_(torch.randn(lora.lokr_w2.shape, generator=g))
    path = save_lokr(net, tmp_path / "a.safetensors", {}, unet=sdxl.unet, dtype="fp32")
    other = tiny_sdxl()
    fresh = create_lokr(other, CFG)
    assert init_from_lokr(fresh, other, path) == "sd-scripts"
    got, want = lokr_state_dict(fresh), lokr_state_dict(net)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a config with Attention factor 2: a 64 -> 64 Linear has w1 (2, 2) there, (4, 4) in the file
    other = tiny_sdxl()
    with pytest.raises(HakubooruError, match=r"lokr_w\d is \(\d+, \d+\) in the file but \(\d+, \d+\) with this "
                                             r"config's factors"):
        init_from_lokr(create_lokr(other, {**CFG, "factors": {**FACTORS, "Attention": 2}}), other, path)
