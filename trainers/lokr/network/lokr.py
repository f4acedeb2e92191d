"""The LyCORIS LoKr over SDXL: which modules it wraps, its factors, optimizer groups, saving."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

from hakubooru.errors import HakubooruError
from trainers.lokr.network import naming as naming_
from trainers.lokr.safetensors_file import sd_scripts_hashes, write_safetensors

# The LoKr's module groups, the keys of [lokr.factors] (docs/lokr.md). The UNet's are diffusers
# classes (LyCORIS walks every Linear / Conv, and norm with lokr.train_norm, inside one) or
# top-level names; `Attention` and `FeedForward` sit inside `Transformer2DModel` and take their own
# factor. The text encoders' are found by what a module is, not by its class name (transformers
# names CLIP's attention CLIPAttention, CLIPSdpaAttention or CLIPFlashAttention2 by version).
UNET_NESTED = ("Attention", "FeedForward")
UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
UNET_NAMES = {"conv_in_out": ("conv_in", "conv_norm_out", "conv_out"),
              "embeddings": ("time_embedding.linear_1", "time_embedding.linear_2",
                             "add_embedding.linear_1", "add_embedding.linear_2")}
TEXT_GROUPS = {"CLIPAttention": ("q_proj", "k_proj", "v_proj", "out_proj"), "CLIPMLP": ("fc1", "fc2")}
GROUPS = UNET_NESTED + UNET_BLOCKS + tuple(UNET_NAMES) + tuple(TEXT_GROUPS)
# The same modules on sd-scripts' own SDXL UNet (library/sdxl_original_unet.py), so that the preset
# stored in a file's metadata recreates the network there too.
SD_SCRIPTS_CLASSES = {"Attention": ("CrossAttention",)}
SD_SCRIPTS_NAMES = {"conv_in_out": ("input_blocks.0.0", "out.0", "out.2"),
                    "embeddings": ("time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2")}
KNOWN_TEXT_CLASSES = {"CLIPAttention": ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"),
                      "CLIPMLP": ("CLIPMLP",)}
# LyCORIS's "dim" in full-matrix mode: unused for the shapes, but stored as every module's
# alpha (alpha = dim, scale 1), so it must survive fp16 exactly (100000 would become inf).
FULL_MATRIX_DIM = 10_000
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@contextmanager
def quiet_lycoris():
    """LyCORIS logs every creation step at INFO on stdout; keep only its warnings."""
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class TextModelView(torch.nn.Module):
    """Holds a text encoder as `.text_model`, so LoKr names read `lora_te1_text_model_…`.

    transformers ≥ 5.6 flattened `CLIPTextModel` (no `text_model` level); kohya, ComfyUI and
    A1111 files name text encoder 1's modules with it. The view only renames: the LoKr hooks
    the encoder's own Linear layers.
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.text_model = encoder


def kohya_text_encoders(sdxl) -> list[torch.nn.Module]:
    """[text encoder 1, text encoder 2] as the kohya wrapper must see them for standard names."""
    return [te if hasattr(te, "text_model") else TextModelView(te)
            for te in (sdxl.text_encoder_1, sdxl.text_encoder_2)]


def check_factors(factors: dict) -> dict[str, int]:
    """The groups the [lokr.factors] table wraps, with their factors: known groups, each
    factor a positive integer, or 0 for a group left out."""
    unknown = sorted(set(factors) - set(GROUPS))
    if unknown:
        raise HakubooruError(f"unknown LoKr factor key(s) {unknown}; known: {list(GROUPS)}")
    for name, f in factors.items():
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise HakubooruError(f"[lokr.factors] {name} = {f!r}: a factor must be a positive integer (0: left out)")
    wrapped = {name: f for name, f in factors.items() if f}
    if not wrapped:
        raise HakubooruError("[lokr.factors] names no module group; known: " + ", ".join(GROUPS))
    return wrapped


def _wrapped(module: torch.nn.Module, train_norm: bool) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or (train_norm and isinstance(module, naming_.NORMS))


def _text_blocks(encoder: torch.nn.Module, group: str):
    """(path, module) of every block of `encoder` that is a `group` by its children's names:
    a self-attention has q/k/v/out projections, an MLP fc1 and fc2, each a Linear."""
    leaves = TEXT_GROUPS[group]
    for path, module in encoder.named_modules():
        children = dict(module.named_children())
        if all(isinstance(children.get(leaf), torch.nn.Linear) for leaf in leaves):
            yield path, module


def lokr_targets(sdxl, lokr_cfg: dict, *, text_encoders: bool = True) -> dict[str, tuple[str, str]]:
    """{LoKr module name: (network, group)} of every module the config's groups name, found from
    the models' structure: what LyCORIS must wrap. Order: UNet, then text encoders 1 and 2."""
    factors = check_factors(dict(lokr_cfg.get("factors", {})))
    train_norm = bool(lokr_cfg.get("train_norm", False))
    out: dict[str, tuple[str, str]] = {}
    for block_path, block in sdxl.unet.named_modules():
        group = type(block).__name__
        if group not in UNET_BLOCKS:
            continue
        for path, module in block.named_modules():
            inner = next((g for g in UNET_NESTED if g in factors and _is_inside(block, path, g)), group)
            if inner in factors and _wrapped(module, train_norm):
                out.setdefault(naming_.lokr_name(f"{block_path}.{path}"), ("unet", inner))
    modules = dict(sdxl.unet.named_modules())
    for group, names in UNET_NAMES.items():
        for name in names:
            if group in factors and name in modules and _wrapped(modules[name], train_norm):
                out[naming_.lokr_name(name)] = ("unet", group)
    if text_encoders:
        for k, encoder in enumerate(kohya_text_encoders(sdxl), start=1):
            for group in TEXT_GROUPS:
                if group not in factors:
                    continue
                for path, block in _text_blocks(encoder, group):
                    for leaf in TEXT_GROUPS[group]:
                        out[naming_.lokr_name(f"{path}.{leaf}", f"lora_te{k}_")] = (f"te{k}", group)
    return out


def _is_inside(block: torch.nn.Module, path: str, cls: str) -> bool:
    """Whether the module at `path` under `block` is, or lies inside, a module of class `cls`."""
    parts = path.split(".") if path else []
    module = block
    for part in parts:
        module = getattr(module, part)
        if type(module).__name__ == cls:
            return True
    return False


def lokr_preset(sdxl, lokr_cfg: dict, *, text_encoders: bool = True) -> dict:
    """The LyCORIS preset of the config's network: target classes and names, a factor per group.

    Valid for diffusers' SDXL UNet (ours) and sd-scripts' own, and for every transformers CLIP
    attention class: stored in the LoKr's metadata, it recreates the network in either."""
    factors = check_factors(dict(lokr_cfg.get("factors", {})))
    lokr = lambda group: {"algo": "lokr", "factor": factors[group]}  # noqa: E731
    text_classes = {g: set(KNOWN_TEXT_CLASSES[g]) for g in TEXT_GROUPS if g in factors and text_encoders}
    for encoder in (sdxl.text_encoder_1, sdxl.text_encoder_2):
        for group, classes in text_classes.items():
            classes.update(type(block).__name__ for _, block in _text_blocks(encoder, group))
    module_map, names, name_map = {}, [], {}
    for group in UNET_NESTED + UNET_BLOCKS:
        if group in factors:
            for cls in (group, *SD_SCRIPTS_CLASSES.get(group, ())):
                module_map[cls] = lokr(group)
    for group, classes in text_classes.items():
        module_map.update({cls: lokr(group) for cls in sorted(classes)})
    for group in UNET_NAMES:
        if group in factors:
            for name in UNET_NAMES[group] + SD_SCRIPTS_NAMES[group]:
                pattern = re.escape(name) + "$"
                names.append(pattern)
                name_map[pattern] = lokr(group)
    blocks = [g for g in UNET_BLOCKS if g in factors]
    if "Transformer2DModel" not in factors:  # attention / feed-forward alone: target them directly
        blocks += [cls for g in UNET_NESTED if g in factors for cls in (g, *SD_SCRIPTS_CLASSES.get(g, ()))]
    return {
        "enable_conv": True,
        "unet_target_module": blocks,
        "unet_target_name": names,
        "text_encoder_target_module": sorted(c for classes in text_classes.values() for c in classes),
        "text_encoder_target_name": [],
        "module_algo_map": module_map,
        "name_algo_map": name_map,
        "use_fnmatch": False,
        "exclude_name": [],
    }


def create_lokr(sdxl, lokr_cfg: dict, *, text_encoders: bool = True) -> LycorisNetworkKohya:
    """Create the LoKr over `sdxl` from the config's [lokr] table and hook it into the models.

    Full matrix (alpha = dim, so scale 1); one LoKr per Linear / Conv (and, with `train_norm`,
    a norm offset per GroupNorm / LayerNorm) of the module groups `[lokr.factors]` names, with
    the group's factor. Starts as an exact no-op (w2 and the norm offsets are zero). A group
    that would wrap fewer modules than the models have is refused, naming it.
    """
    if not lokr_cfg.get("full_matrix", True):
        raise HakubooruError("lokr.full_matrix = false is not supported: the recipe's LoKr is full matrix")
    targets = lokr_targets(sdxl, lokr_cfg, text_encoders=text_encoders)
    # The preset is class-level state in LyCORIS: set it right before each creation.
    LycorisNetworkKohya.apply_preset(lokr_preset(sdxl, lokr_cfg, text_encoders=text_encoders))
    dim = FULL_MATRIX_DIM
    with quiet_lycoris():
        network = LycorisNetworkKohya(
            kohya_text_encoders(sdxl) if text_encoders else None, sdxl.unet,
            multiplier=1.0, lora_dim=dim, conv_lora_dim=dim, alpha=dim, conv_alpha=dim,
            network_module="lokr", full_matrix=True, factor=-1, decompose_both=False,
            train_norm=bool(lokr_cfg.get("train_norm", False)),
            bypass_mode=bool(lokr_cfg.get("bypass_mode", False)),  # speed only: same weights, same files
            warn_on_unmatched=False,
        )
        network.apply_to(None, None, apply_text_encoder=text_encoders, apply_unet=True)
    _check_coverage(network, targets)
    return network


def _check_coverage(network, targets: dict[str, tuple[str, str]]) -> None:
    """Every module the groups name is wrapped, and nothing else: else one line naming the group."""
    made = {lora.lora_name for lora in network.loras}
    for (net, group) in dict.fromkeys(targets.values()):
        want = {n for n, ng in targets.items() if ng == (net, group)}
        if not want <= made:
            missing = sorted(want - made)
            raise HakubooruError(f"LoKr group {group} ({net}) wraps {len(want) - len(missing)} of the {len(want)} "
                                 f"modules it names, e.g. not {missing[0]}: this diffusers / transformers version "
                                 "names its modules otherwise; please report it")
    extra = sorted(made - targets.keys())
    if extra:
        raise HakubooruError(f"the LoKr wraps {len(extra)} module(s) no group names, e.g. {extra[0]}")
    if not made:
        raise HakubooruError("the LoKr wraps no module: [lokr.factors] names no group this model has")


def lokr_param_groups(network, lr_unet: float, lr_text: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: text encoders' LoKr at `lr_text`, the UNet's at `lr_unet`."""
    groups = []
    for name, loras, lr in (("text", network.text_encoder_loras, lr_text), ("unet", network.unet_loras, lr_unet)):
        params = [p for lora in loras for p in lora.parameters() if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
    return groups


def lokr_state_dict(network) -> dict[str, torch.Tensor]:
    """The LoKr weights in fp32 on the CPU (kohya keys), for training state and exact resume:
    the parameters themselves where they already are fp32 on the CPU (no copy; write them before
    the next step)."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in network.state_dict().items()}


def save_lokr(network, path: str | os.PathLike, metadata: dict, *, unet: torch.nn.Module,
              dtype: str = "fp16", naming: str = "sd-scripts") -> Path:
    """Write the LoKr as safetensors (`<name>.alpha/.lokr_w1/.lokr_w2`, a norm's `.w_norm/.b_norm`), atomically and with
    reproducible bytes: the same weights and metadata give the same file.

    `naming` "sd-scripts" (default) names UNet modules by the original checkpoint's paths, as
    sd-scripts does; "diffusers" keeps diffusers' module paths (see trainers/lokr/network/naming.py).
    `metadata` values are stored as strings (non-strings as JSON); sd-scripts' `sshs_model_hash`
    and `sshs_legacy_hash` are added. `dtype` is fp16, bf16 or fp32.
    """
    if dtype not in SAVE_DTYPES:
        raise HakubooruError(f"save dtype {dtype!r} is not one of {sorted(SAVE_DTYPES)}")
    if naming not in naming_.NAMINGS:
        raise HakubooruError(f"lokr.naming = {naming!r} is not one of {', '.join(naming_.NAMINGS)}")
    tensors = {k: v.detach().to("cpu", SAVE_DTYPES[dtype]) for k, v in network.state_dict().items()}
    tensors = naming_.to_naming(tensors, unet, naming)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    meta.setdefault("ss_network_module", "lycoris.kohya")
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sd_scripts_hashes(tensors, meta)
    return write_safetensors(path, tensors, meta)


def read_lokr(path: str | os.PathLike, unet: torch.nn.Module) -> tuple[dict, dict, str]:
    """(tensors in diffusers-path names, metadata, naming found) of a LoKr file in either naming."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HakubooruError(f"LoKr file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise HakubooruError(f"cannot read LoKr file {path}: {exc}") from None
    try:
        tensors, found = naming_.to_diffusers(tensors, unet)
    except ValueError as exc:
        raise HakubooruError(f"{path}: {exc}") from None
    return tensors, metadata, found


@contextmanager
def _empty_preset():
    """LyCORIS's kohya loader first builds a throwaway network with the class-level preset
    (whose default wraps diffusers' time embedding twice and fails on "duplicated lora name"),
    then replaces its modules by the file's: make that throwaway empty, then restore the preset."""
    keys = ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
            "TEXT_ENCODER_TARGET_REPLACE_NAME")
    saved = {k: getattr(LycorisNetworkKohya, k) for k in keys}
    LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": [],
                                      "text_encoder_target_module": [], "text_encoder_target_name": []})
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)


def load_lokr(sdxl, path: str | os.PathLike, *, multiplier: float = 1.0, apply: bool = True,
              quiet: bool = False):
    """Load a LoKr file (sd-scripts or diffusers naming) onto `sdxl` with LyCORIS's kohya loader.

    With `apply` the LoKr is hooked into the models' forward (as in training); without, the
    network is returned unhooked, e.g. for `network.merge_to(...)`. A file with a module this
    model lacks is refused, naming it. Prints which naming it found unless `quiet`.
    """
    tensors, _, found = read_lokr(path, sdxl.unet)
    try:
        with quiet_lycoris(), _empty_preset():
            network, _ = create_network_from_weights(
                multiplier, None, None, kohya_text_encoders(sdxl), sdxl.unet, weights_sd=tensors)
    # wrong shapes, unknown module kinds; a module missing a tensor (LyCORIS then uses None)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HakubooruError(f"cannot load LoKr file {path}: {str(exc).splitlines()[0]}") from None
    in_file = {naming_.module_name(k) for k in tensors if "." in k}
    loaded = {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras}
    if in_file != loaded:
        missing = sorted(in_file - loaded)
        raise HakubooruError(f"{path}: {len(missing)} of its {len(in_file)} LoKr modules match no module of this "
                             f"model, e.g. {missing[0]}; is it a LoKr for SDXL?")
    if not quiet:
        print(f"loaded {path}: {len(loaded)} LoKr modules, {found} naming", file=sys.stderr)
    if apply:
        with quiet_lycoris():
            network.apply_to(None, None, apply_text_encoder=True, apply_unet=True)
    return network


def init_from_lokr(network, sdxl, path: str | os.PathLike) -> str:
    """Set the LoKr weights of `network` from a LoKr file (ours, or sd-scripts + LyCORIS's, in
    either naming), e.g. to continue training a released LoKr. The file must have exactly the
    network's modules, each full matrix with the shapes the config's factors give; the first
    mismatch is named. Returns the naming found."""
    tensors, _, found = read_lokr(path, sdxl.unet)
    own = network.state_dict()
    low_rank = sorted(k for k in tensors if k.endswith(("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")))
    if low_rank:
        raise HakubooruError(f"{path} is a low-rank LoKr ({low_rank[0]}); the trainer's LoKr is full matrix "
                             "(lokr_w1, lokr_w2 per module)")
    file_modules = {naming_.module_name(k) for k in tensors if "." in k}
    own_modules = {naming_.module_name(k) for k in own}
    for what, names in (("lacks", own_modules - file_modules), ("has modules the config does not wrap, e.g.",
                                                                 file_modules - own_modules)):
        if names:
            raise HakubooruError(f"{path} {what} {sorted(names)[0]} ({len(names)} module(s)); it was made for "
                                 "another set of modules: check [lokr.factors] and the base model")
    weights = {}
    for key, value in own.items():
        if key.endswith(".alpha"):
            weights[key] = value
            continue
        if key not in tensors:
            raise HakubooruError(f"{path}: module {naming_.module_name(key)} lacks {key.rsplit('.', 1)[1]}")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise HakubooruError(
                f"{path}: {key} is {tuple(tensors[key].shape)} in the file but {tuple(value.shape)} with this "
                "config's factors; set [lokr.factors] to the file's (the factor is the first dimension of lokr_w1)")
        weights[key] = tensors[key].to(value.dtype)
    network.load_state_dict(weights)
    print(f"initialised the LoKr from {path}: {len(own_modules)} modules, {found} naming", file=sys.stderr)
    return found
