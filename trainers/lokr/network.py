"""The LyCORIS LoKr over SDXL: which modules it wraps, its factors, optimizer groups, saving."""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

from hakubooru.errors import HakubooruError

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
    """The LoKr weights in fp32 on the CPU (kohya keys), for training state and exact resume."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in network.state_dict().items()}


def save_lokr(network, path: str | os.PathLike, metadata: dict, *, dtype: str = "fp16") -> Path:
    """Write the LoKr as safetensors (kohya keys: `<name>.alpha/.lokr_w1/.lokr_w2`), atomically.

    `metadata` values are stored as strings (non-strings as JSON): put the config, the
    base-model hash and the step there. `dtype` is fp16, bf16 or fp32.
    """
    if dtype not in SAVE_DTYPES:
        raise HakubooruError(f"save dtype {dtype!r} is not one of {sorted(SAVE_DTYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    meta.setdefault("ss_network_module", "lycoris.kohya")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.safetensors")
    network.save_weights(str(tmp), SAVE_DTYPES[dtype], meta)
    os.replace(tmp, path)
    return path


def load_lokr(sdxl, path: str | os.PathLike, *, multiplier: float = 1.0, apply: bool = True):
    """Load a saved LoKr file onto `sdxl` with LyCORIS's kohya loader.

    With `apply` the LoKr is hooked into the models' forward (as in training); without, the
    network is returned unhooked, e.g. for `network.merge_to(...)`.
    """
    path = Path(path)
    if not path.is_file():
        raise HakubooruError(f"LoKr file not found: {path}")
    try:
        with quiet_lycoris():
            network, weights = create_network_from_weights(
                multiplier, str(path), None, kohya_text_encoders(sdxl), sdxl.unet)
    except (SafetensorError, RuntimeError, ValueError, KeyError) as exc:  # unreadable file, wrong shapes
        raise HakubooruError(f"cannot read LoKr file {path}: {exc}") from exc
    n_files = len({k.split(".")[0] for k in weights if "." in k})
    if n_files != len(network.unet_loras) + len(network.text_encoder_loras):
        raise HakubooruError(
            f"{path}: {n_files} LoKr modules in the file, but only "
            f"{len(network.unet_loras) + len(network.text_encoder_loras)} match this model's modules")
    if apply:
        with quiet_lycoris():
            network.apply_to(None, None, apply_text_encoder=True, apply_unet=True)
    return network
