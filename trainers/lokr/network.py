"""The LyCORIS LoKr over SDXL: which modules it wraps, its factors, optimizer groups, saving."""
from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

from hakubooru.errors import HakubooruError
from trainers.lokr import naming as naming_
from trainers.lokr.safetensors_file import sd_scripts_hashes, write_safetensors

# Module classes the LoKr covers (class names inside diffusers' UNet / transformers' CLIP):
# every Linear / Conv inside one of them gets its own LoKr, factor from the config by class.
UNET_TARGETS = ("Attention", "FeedForward", "ResnetBlock2D")
TEXT_TARGETS = ("CLIPAttention", "CLIPMLP")
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


def lokr_preset(factors: dict[str, int]) -> dict:
    """The LyCORIS preset: target blocks of UNet and text encoders, a factor per block class."""
    unknown = set(factors) - set(UNET_TARGETS) - set(TEXT_TARGETS)
    if unknown:
        raise HakubooruError(
            f"unknown LoKr factor key(s) {sorted(unknown)}; known: {list(UNET_TARGETS + TEXT_TARGETS)}")
    missing = [k for k in UNET_TARGETS + TEXT_TARGETS if k not in factors]
    if missing:
        raise HakubooruError(f"[lokr.factors] lacks {missing}")
    for name, f in factors.items():
        if not isinstance(f, int) or isinstance(f, bool) or f < 1:
            raise HakubooruError(f"[lokr.factors] {name} = {f!r}: a factor must be a positive integer")
    return {
        "enable_conv": True,
        "unet_target_module": list(UNET_TARGETS),
        "unet_target_name": [],
        "text_encoder_target_module": list(TEXT_TARGETS),
        "text_encoder_target_name": [],
        "module_algo_map": {name: {"algo": "lokr", "factor": f} for name, f in factors.items()},
        "name_algo_map": {},
        "use_fnmatch": False,
        "exclude_name": [],
    }


def create_lokr(sdxl, lokr_cfg: dict, *, text_encoders: bool = True) -> LycorisNetworkKohya:
    """Create the LoKr over `sdxl` from the config's [lokr] table and hook it into the models.

    Full matrix (alpha = dim, so scale 1); one LoKr per Linear / Conv inside the UNet's
    Attention, FeedForward, ResnetBlock2D blocks and the text encoders' CLIPAttention, CLIPMLP
    blocks, factor by block class. Starts as an exact no-op (w2 is zero).
    """
    if not lokr_cfg.get("full_matrix", True):
        raise HakubooruError("lokr.full_matrix = false is not supported: the recipe's LoKr is full "
                             "matrix, and LyCORIS merges low-rank LoKr with its scale applied twice")
    # The preset is class-level state in LyCORIS: set it right before each creation.
    LycorisNetworkKohya.apply_preset(lokr_preset(dict(lokr_cfg.get("factors", {}))))
    dim = FULL_MATRIX_DIM
    with quiet_lycoris():
        network = LycorisNetworkKohya(
            kohya_text_encoders(sdxl) if text_encoders else None, sdxl.unet,
            multiplier=1.0, lora_dim=dim, conv_lora_dim=dim, alpha=dim, conv_alpha=dim,
            network_module="lokr", full_matrix=True, factor=-1, decompose_both=False,
            bypass_mode=bool(lokr_cfg.get("bypass_mode", False)),  # speed only: same weights, same files
            warn_on_unmatched=False,
        )
        network.apply_to(None, None, apply_text_encoder=text_encoders, apply_unet=True)
    return network


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
    """Write the LoKr as safetensors (`<name>.alpha/.lokr_w1/.lokr_w2`), atomically and with
    reproducible bytes: the same weights and metadata give the same file.

    `naming` "sd-scripts" (default) names UNet modules by the original checkpoint's paths, as
    sd-scripts does; "diffusers" keeps diffusers' module paths (see trainers/lokr/naming.py).
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
