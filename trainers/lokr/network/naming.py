"""LoKr module names: sd-scripts' SDXL names (the default) and diffusers-path names.

LyCORIS names each module it wraps after its path in the module tree it walks. On our diffusers
UNet that gives `lora_unet_down_blocks_1_attentions_0_…`; kohya-ss/sd-scripts trains SDXL on a
UNet laid out like the original checkpoint, so its files (and the published epsilon LoKr) say
`lora_unet_input_blocks_4_1_…`, `lora_unet_middle_block_1_…`, `lora_unet_output_blocks_…`. The
text encoders are Hugging Face CLIP models in both: `lora_te1_text_model_…`, `lora_te2_text_model_…`.

Inside the trainer the network always carries diffusers-path names; files are renamed on the way
out (`rename`) and on the way in (`to_diffusers`), through the map `unet_names(unet)` built from
the UNet's own module tree and `ldm.unet_key`, so both directions are exact.
"""
from __future__ import annotations

import re
import torch

from trainers.lokr.sdxl.ldm import TE1, TE2, UNET, unet_key

NAMINGS = ("sd-scripts", "diffusers")
UNET_PREFIX = "lora_unet_"
_LDM_UNET = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")
_DIFFUSERS_UNET = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks|time_embedding|add_embedding|conv_)")


NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)  # with lokr.train_norm: an offset per channel
WEIGHTED = (torch.nn.Linear, torch.nn.Conv2d, *NORMS)  # what a LoKr may wrap


def unet_modules(unet: torch.nn.Module) -> list[tuple[str, str]]:
    """(diffusers path, ldm path) of every Linear / Conv2d / norm of `unet`, e.g.
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in")."""
    return [(p, unet_key(p + ".weight", unet.config).removesuffix(".weight"))
            for p, m in unet.named_modules() if isinstance(m, WEIGHTED)]


def lokr_name(path: str, prefix: str = UNET_PREFIX) -> str:
    """The LoKr module name of a module path: `lora_unet_` + the path with `_` for `.`."""
    return prefix + path.replace(".", "_")


def unet_names(unet: torch.nn.Module) -> dict[str, str]:
    """{diffusers-path LoKr name: sd-scripts LoKr name} for every module of `unet` a LoKr may wrap."""
    return {lokr_name(diff): lokr_name(ldm) for diff, ldm in unet_modules(unet)}


def module_name(key: str) -> str:
    """The module part of a LoKr file key: `lora_unet_x.lokr_w1` -> `lora_unet_x`."""
    return key.split(".", 1)[0]


def detect(names) -> str:
    """Which naming a set of LoKr module names uses: "sd-scripts", "diffusers", or "text-only"
    (names of the text encoders only, the same in both). Raises ValueError when it is mixed."""
    unet = [n for n in names if n.startswith(UNET_PREFIX)]
    ldm = sum(bool(_LDM_UNET.match(n)) for n in unet)
    diffusers = sum(bool(_DIFFUSERS_UNET.match(n)) for n in unet)
    if ldm and diffusers:
        raise ValueError(f"mixed LoKr naming: {ldm} sd-scripts UNet names and {diffusers} diffusers-path names")
    if not unet:
        return "text-only"
    return "sd-scripts" if ldm else "diffusers"


def rename(state: dict, mapping: dict[str, str]) -> dict:
    """`state` with each key's module part renamed through `mapping` (other keys unchanged)."""
    out = {}
    for key, value in state.items():
        module, dot, rest = key.partition(".")
        out[mapping.get(module, module) + dot + rest] = value
    return out


def to_naming(state: dict, unet: torch.nn.Module, naming: str) -> dict:
    """A LoKr state dict in diffusers-path names, renamed to `naming` ("sd-scripts" or "diffusers")."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown LoKr naming {naming!r}; known: {', '.join(NAMINGS)}")
    return state if naming == "diffusers" else rename(state, unet_names(unet))


def to_diffusers(state: dict, unet: torch.nn.Module) -> tuple[dict, str]:
    """A LoKr state dict in either naming, in diffusers-path names; also returns the naming found."""
    found = detect({module_name(k) for k in state})
    if found != "sd-scripts":
        return state, found
    return rename(state, {ldm: diff for diff, ldm in unet_names(unet).items()}), found


def ldm_paths(unet: torch.nn.Module) -> dict[str, str]:
    """{sd-scripts LoKr name: ldm module path} of every module of `unet` a LoKr may wrap."""
    return {lokr_name(ldm): ldm for _, ldm in unet_modules(unet)}


def checkpoint_target(name: str, paths: dict[str, str]) -> tuple[str, int | None]:
    """The tensor of an SDXL single-file checkpoint that the LoKr module `name` (sd-scripts
    naming) changes, as (key, part): `part` is 0, 1 or 2 for text encoder 2's q, k, v projections,
    which the checkpoint fuses into one `in_proj_weight` (q, k, v stacked along rows), else None.
    `paths` is `ldm_paths(unet)`, built once for many names."""
    if name.startswith(UNET_PREFIX):
        if name not in paths:
            raise KeyError(f"no SDXL UNet module is named {name}")
        return UNET + paths[name] + ".weight", None
    if name.startswith("lora_te1_text_model_"):
        return TE1 + _hf_clip_path(name.removeprefix("lora_te1_")) + ".weight", None
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", name):
        layer, block, leaf = m.groups()
        base = f"{TE2}transformer.resblocks.{layer}."
        if block == "self_attn" and leaf in ("q_proj", "k_proj", "v_proj"):
            return base + "attn.in_proj_weight", "qkv".index(leaf[0])
        leaf_map = {("self_attn", "out_proj"): "attn.out_proj", ("mlp", "fc1"): "mlp.c_fc", ("mlp", "fc2"): "mlp.c_proj"}
        if (block, leaf) in leaf_map:
            return base + leaf_map[block, leaf] + ".weight", None
    raise KeyError(f"no SDXL checkpoint tensor for LoKr module {name}")


def _hf_clip_path(rest: str) -> str:
    m = re.fullmatch(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", rest)
    if not m:
        raise KeyError(f"not a CLIP encoder-layer LoKr name: lora_te1_{rest}")
    return f"text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}"
