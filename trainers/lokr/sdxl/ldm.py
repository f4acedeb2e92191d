"""diffusers → original ("ldm") SDXL single-file key layout, the layout of community
checkpoints (sd-webui, ComfyUI, kohya). Loading goes the other way (trainers/lokr/sdxl/loading.py);
tests check that it gives back exactly what this writes."""
from __future__ import annotations

import math
import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
# OpenCLIP's contrastive temperature: in every SDXL single file, unused by SDXL, absent from
# transformers' CLIPTextModelWithProjection. SDXL base 1.0 stores ln(100) (OpenCLIP's clamp).
LOGIT_SCALE = TE2 + "logit_scale"
POSITION_IDS = TE1 + "text_model.embeddings.position_ids"

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
               ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_key(key: str, config) -> str:
    """The ldm name of one diffusers UNet parameter (layout from `layers_per_block` and the
    block types, as diffusers' loader reads it back)."""
    lpb = config["layers_per_block"]
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i = 1 + int(m[1]) * (lpb + 1) + int(m[3])
        return f"input_blocks.{i}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{i}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i = int(m[1]) * (lpb + 1) + int(m[3])
        return f"output_blocks.{i}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{i}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if config["up_block_types"][b].startswith("CrossAttn") else 1
        return f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
    raise KeyError(f"no ldm name for UNet parameter {key}")


def vae_key(key: str, config) -> str:
    """The ldm name of one diffusers VAE parameter."""
    n_up = len(config["up_block_types"])
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", key)
    return re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", key)


def openclip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoder 2 (CLIPTextModelWithProjection) in OpenCLIP names: q, k, v fused into
    `in_proj_*`, projection transposed."""
    out, qkv = {}, {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = m[2]
            for new, old in _CLIP_LAYER:
                rest = rest.replace(new, old)
            out[f"transformer.resblocks.{m[1]}.{rest}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder 2 parameter {key}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sdxl_to_ldm(sdxl) -> dict[str, torch.Tensor]:
    """The whole SDXL (UNet, VAE, both text encoders) as one original-layout state dict."""
    out = {UNET + unet_key(k, sdxl.unet.config): v for k, v in sdxl.unet.state_dict().items()}
    for k, v in sdxl.vae.state_dict().items():
        name = vae_key(k, sdxl.vae.config)
        out[VAE + name] = v[:, :, None, None] if ".mid.attn_1." in name and v.ndim == 2 else v
    te1 = sdxl.text_encoder_1.state_dict()
    flat = not hasattr(sdxl.text_encoder_1, "text_model")  # transformers ≥ 5.6 dropped the level
    out.update({TE1 + ("text_model." if flat else "") + k: v for k, v in te1.items()})
    out.update({TE2 + k: v for k, v in openclip_state_dict(sdxl.text_encoder_2.state_dict()).items()})
    return out


def single_file_state(sdxl, extras: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an SDXL single-file checkpoint of `sdxl`: `sdxl_to_ldm` plus the tensors
    that no diffusers component holds (`extras`, e.g. taken from the base file; else
    `logit_scale` = ln 100) and text encoder 1's `position_ids` (a buffer transformers does
    not save, which the published file carries: 1 x 77, int64)."""
    out = sdxl_to_ldm(sdxl)
    out[LOGIT_SCALE] = torch.tensor(math.log(100.0))
    positions = sdxl.text_encoder_1.config.max_position_embeddings
    out[POSITION_IDS] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    out.update(extras or {})
    return out
