"""trainers.lokr.sdxl.fake: the narrow configs keep SDXL's wiring, and the random weights are
drawn as its docstring says."""
import json
import math

import torch

from trainers.lokr.sdxl.fake import narrow_configs, random_sdxl, single_file_state


def test_narrow_configs_keep_the_widths_sdxl_wires_together(tmp_path):
    folder = narrow_configs(tmp_path / "narrow")
    cfg = {sub: json.loads((folder / sub / "config.json").read_text())
           for sub in ("unet", "text_encoder", "text_encoder_2")}
    unet = cfg["unet"]
    # the UNet's added embedding takes text encoder 2's pooled projection and 6 time ids
    # (SDXL 1.0: 2816 = 1280 + 6 * 256; narrow: 112 = 64 + 6 * 8)
    assert unet["projection_class_embeddings_input_dim"] == 112
    assert cfg["text_encoder_2"]["projection_dim"] == 112 - 6 * unet["addition_time_embed_dim"] == 64
    # cross-attention sees both encoders' hidden states side by side (SDXL: 768 + 1280 = 2048)
    assert unet["cross_attention_dim"] == cfg["text_encoder"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"] == 96


def test_random_weights_are_drawn_as_documented(tmp_path):
    sdxl = random_sdxl(narrow_configs(tmp_path / "narrow"), seed=0)
    seen = {"ones": 0, "zeros": 0, "uniform": 0}
    for model in (sdxl.unet, sdxl.vae, sdxl.text_encoder_1, sdxl.text_encoder_2):
        for name, p in model.named_parameters():
            p = p.detach().float()
            if p.ndim == 1:  # norms' weights are ones, every bias is zero
                kind = "ones" if name.endswith("weight") else "zeros"
                assert torch.equal(p, torch.ones_like(p) if kind == "ones" else torch.zeros_like(p)), name
                seen[kind] += 1
            elif not ("embedding" in name and p.ndim == 2 and "linear" not in name):
                bound = 1 / math.sqrt(p[0].numel())  # uniform ±1/√fan-in, fan-in = one output's inputs
                assert p.abs().max() <= bound * (1 + 1e-3), name
                seen["uniform"] += 1
    assert min(seen.values()) > 0
    tokens = sdxl.text_encoder_2.get_input_embeddings().weight.detach().float()
    assert abs(tokens.std().item() - 0.02) < 0.0005  # N(0, 0.02) over 49408 × 64 draws


def test_single_file_has_openclips_temperature(tmp_path):
    state = single_file_state(random_sdxl(narrow_configs(tmp_path / "narrow"), seed=0))
    # ln 100 = 4.60517 (fp32); ln 101 = 4.61512
    assert abs(state["conditioner.embedders.1.model.logit_scale"].item() - math.log(100.0)) < 1e-6
