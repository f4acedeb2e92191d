"""SDXL components: offline loading (diffusers folder or single file), the tiny test model,
the real SDXL base architecture on the meta device, and saving."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hakubooru.errors import HakubooruError
from trainers.lokr.sdxl.prediction import Prediction, detect, scheduler_options

SDXL_CONFIGS = Path(__file__).parent / "configs"
# Subfolder of a diffusers SDXL folder -> the file that must be there for it to load.
COMPONENT_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
}
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}  # train.mixed_precision


@dataclass
class SDXL:
    """The pieces of SDXL a trainer touches; `noise_scheduler` is the training DDPM schedule."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_1: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler

    def to(self, device=None, dtype=None) -> "SDXL":
        """Move the three networks (in place) and return self."""
        for model in (self.unet, self.vae, self.text_encoder_1, self.text_encoder_2):
            model.to(device=device, dtype=dtype)
        return self


def training_scheduler(config: dict | None = None, prediction: Prediction | None = None) -> DDPMScheduler:
    """SDXL's training noise schedule: DDPM, scaled-linear betas 0.00085..0.012, 1000 steps; ε and
    the betas as they are unless ``prediction`` says v and/or zero-terminal SNR (rescaled betas)."""
    base = dict(config or {})
    base.update(
        beta_start=base.get("beta_start", 0.00085),
        beta_end=base.get("beta_end", 0.012),
        beta_schedule="scaled_linear",
        num_train_timesteps=base.get("num_train_timesteps", 1000),
        clip_sample=False,
        **scheduler_options(prediction or Prediction()),
    )
    return DDPMScheduler.from_config(base)


# ---------------------------------------------------------------- tiny model


def tiny_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Two byte-level CLIP tokenizers built offline: one token per character (no merges).

    The vocabulary is the 256 byte symbols, their end-of-word forms, then BOS and EOS last
    (as in CLIP, where they are the two highest ids). Tokenizer 2 pads with "!" like SDXL's.
    """
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:
        return CLIPTokenizer(vocab=vocab, merges=[]), CLIPTokenizer(vocab=vocab, merges=[], pad_token="!")
    except TypeError:  # transformers < 5 builds a CLIP tokenizer from its two files only
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            files = {"vocab_file": Path(tmp) / "vocab.json", "merges_file": Path(tmp) / "merges.txt"}
            files["vocab_file"].write_text(json.dumps(vocab))
            files["merges_file"].write_text("#version: 0.2\n")
            return CLIPTokenizer(**files), CLIPTokenizer(**files, pad_token="!")


def _text_config(tok: CLIPTokenizer, hidden: int, act: str) -> CLIPTextConfig:
    # The two encoders need different widths (as in SDXL): diffusers' single-file loader
    # tells them apart by it.
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        hidden_act=act, projection_dim=hidden, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def tiny_sdxl(seed: int = 0) -> SDXL:
    """A tiny randomly initialised SDXL: same component classes and wiring, a few MB.

    UNet: DownBlock2D + 2 CrossAttnDownBlock2D, cross-attention on the two text encoders'
    concatenated hidden states (32 + 64), `text_time` added conditioning; VAE with 8x
    downsampling like SDXL's; byte-level tokenizers made locally. Deterministic in `seed`.
    """
    tok1, tok2 = tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(_text_config(tok1, 32, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(_text_config(tok2, 64, "gelu"))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
            cross_attention_dim=32 + 64, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 64,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025,
        )
    return SDXL(unet, vae, te1, te2, tok1, tok2, training_scheduler())


# ---------------------------------------------------------------- real architecture, loading, saving


def sdxl_on_meta() -> SDXL:
    """The SDXL 1.0 base architecture from the bundled configs, on the meta device: shapes
    only, no memory, no weights, no hub. Tokenizers are None (their vocabulary is not shipped)."""
    return sdxl_base_architecture("meta")


def sdxl_base_architecture(device: str | torch.device, dtype: torch.dtype = torch.float32,
                           config: str | os.PathLike = SDXL_CONFIGS) -> SDXL:
    """The SDXL architecture of the config folder `config` (default: SDXL 1.0 base) with
    random weights (or none, on "meta"), built on `device` in `dtype`; the VAE stays float32
    (SDXL's VAE overflows in fp16). No tokenizers."""
    config = Path(config)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2"))
    if dtype != torch.float32:
        for model in (unet, te1, te2):
            model.to(dtype=dtype)
    scheduler = training_scheduler(DDPMScheduler.load_config(config / "scheduler"))
    return SDXL(unet, vae, te1, te2, None, None, scheduler)


def _missing(folder: Path, parts=COMPONENT_FILES) -> list[str]:
    return [f"{sub}/{name}" for sub, name in parts.items() if not (folder / sub / name).is_file()]


def load_sdxl(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              config: str | os.PathLike | None = None, tokenizers: str | os.PathLike | None = None) -> SDXL:
    """Load SDXL offline from a diffusers folder or a single-file `.safetensors` checkpoint.

    For a single file, the component configs come from `config` (a diffusers-layout folder;
    default: the SDXL 1.0 base configs bundled in `sdxl/configs/`), and the tokenizers from
    `tokenizers` (any folder with `tokenizer/` and `tokenizer_2/`, such as a diffusers SDXL
    folder), else from `config` if it has them, else SDXL's own (bundled,
    `hakubooru.clip_tokenizer`). Weights are read one tensor at a time into the model
    built on the meta device (no second copy); the VAE is always fp32, as stored. The
    training schedule is the base's (``prediction.detect``: ε or v, zero-terminal SNR). Never
    contacts the hub.
    """
    path = Path(path)
    if not path.exists():
        raise HakubooruError(f"pretrained model not found: {path}")
    if path.is_dir():
        sdxl = _load_folder(path, dtype)
    elif path.suffix != ".safetensors":
        raise HakubooruError(f"{path}: expected a diffusers folder or a .safetensors checkpoint")
    else:
        sdxl = _load_single_file(path, dtype, Path(config) if config else SDXL_CONFIGS,
                                 Path(tokenizers) if tokenizers else None)
    sdxl.noise_scheduler = training_scheduler(sdxl.noise_scheduler.config, detect(str(path), str(config or "")))
    return sdxl


def _load_folder(path: Path, dtype: torch.dtype) -> SDXL:
    missing = _missing(path)
    if missing:
        raise HakubooruError(
            f"{path} is not a complete diffusers SDXL folder: missing {', '.join(missing)} "
            "(copy them from the SDXL base model's folder of the same name, or pass a single-file .safetensors)")
    from trainers.lokr.sdxl.loading import folder_files, load_folder_components

    files = folder_files(path, dtype)
    if files is not None:  # one safetensors file per component: read without a second copy
        sdxl = sdxl_base_architecture("meta", dtype, path)
        load_folder_components(sdxl, files, dtype)
        sdxl.tokenizer_1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        sdxl.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
        return sdxl
    common = dict(local_files_only=True)
    try:
        return SDXL(
            UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **common),
            # fp32 as stored: reading it in fp16 and casting up would round an fp32 VAE
            AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **common),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **common),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **common),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
            training_scheduler(DDPMScheduler.load_config(path, subfolder="scheduler", **common)),
        )
    except (OSError, ValueError) as exc:  # e.g. weights missing, or only an fp16 "variant" present
        raise HakubooruError(f"cannot load the diffusers folder {path}: {str(exc).splitlines()[0]}") from exc


def _load_single_file(path: Path, dtype: torch.dtype, config: Path, tokenizers: Path | None) -> SDXL:
    from trainers.lokr.sdxl.loading import load_components

    if not config.is_dir():
        raise HakubooruError(f"config folder {config} does not exist (give a diffusers SDXL folder)")
    models = {k: v for k, v in COMPONENT_FILES.items() if k not in TOKENIZER_DIRS}
    missing = _missing(config, models) + ([] if (config / "model_index.json").is_file() else ["model_index.json"])
    if missing:
        raise HakubooruError(f"config folder {config} lacks {', '.join(missing)} (pass a diffusers SDXL folder as config)")
    sdxl = sdxl_base_architecture("meta", dtype, config)
    sdxl.tokenizer_1, sdxl.tokenizer_2 = _single_file_tokenizers(path, config, tokenizers, sdxl)
    load_components(sdxl, path, dtype)
    return sdxl


def _single_file_tokenizers(path: Path, config: Path, tokenizers: Path | None, sdxl: SDXL):
    """From `tokenizers`, else from `config` if it has them, else SDXL's own (bundled)."""
    source = tokenizers or config
    lacking = _missing(source, {k: COMPONENT_FILES[k] for k in TOKENIZER_DIRS})
    if not lacking:
        return (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=True),
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", local_files_only=True))
    if tokenizers is not None:
        raise HakubooruError(f"tokenizer folder {tokenizers} lacks {', '.join(lacking)} "
                             "(give a folder holding tokenizer/ and tokenizer_2/, e.g. a diffusers SDXL folder)")
    from hakubooru.clip_tokenizer import sdxl_tokenizers

    bundled = sdxl_tokenizers()
    vocab = {te.config.vocab_size for te in (sdxl.text_encoder_1, sdxl.text_encoder_2)}
    if vocab != {len(bundled[0])}:
        raise HakubooruError(
            f"no tokenizers for single-file checkpoint {path.name}: its text encoders have a "
            f"{'/'.join(map(str, sorted(vocab)))}-token vocabulary, not CLIP's {len(bundled[0])}; "
            "pass --tokenizers DIR (a folder holding tokenizer/ and tokenizer_2/)")
    return bundled


def save_sdxl(sdxl: SDXL, folder: str | os.PathLike) -> Path:
    """Write `sdxl` as a diffusers SDXL folder (loadable by `load_sdxl` and diffusers),
    to a temporary sibling first, then renamed into place."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    if folder.exists():
        raise HakubooruError(f"{folder} already exists; choose a new output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder_1, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer_1, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
        scheduler=sdxl.noise_scheduler,
    ).save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return folder


def save_sdxl_single_file(sdxl: SDXL, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                          metadata: dict[str, str] | None = None, extras: dict | None = None) -> Path:
    """Write `sdxl` as one original-layout `.safetensors` checkpoint (as sd-webui / ComfyUI
    use), optionally cast to `dtype`, tensor by tensor (no second copy of the model in memory),
    with reproducible bytes; written to a temporary name, then renamed. `extras`: tensors no
    component holds (see `ldm.single_file_state`)."""
    from trainers.lokr.sdxl.ldm import single_file_state
    from trainers.lokr.safetensors_file import write_safetensors

    return write_safetensors(path, single_file_state(sdxl, extras), metadata, dtype=dtype)


def load_base_model(cfg: dict, weight_dtype: torch.dtype):
    """The SDXL parts named by ``model.pretrained`` ("tiny" = the built-in tiny model)."""
    pretrained = cfg["model"]["pretrained"]
    if pretrained == "tiny":
        sdxl = tiny_sdxl(seed=0)
        return sdxl if weight_dtype == torch.float32 else sdxl.to(dtype=weight_dtype)
    return load_sdxl(pretrained, dtype=weight_dtype, tokenizers=cfg["model"]["tokenizers"] or None,
                            config=cfg["model"]["config"] or None)


def base_model_hash(pretrained: str | os.PathLike) -> str:
    """sha256 of the base model's bytes, for the LoKr metadata: of the file for a single-file
    checkpoint (the hash sd-webui and civitai show as "SHA256"), of every file (relative path,
    then content, in sorted order) for a diffusers folder; "tiny" for the built-in tiny model."""
    import hashlib

    from tqdm import tqdm

    if str(pretrained) == "tiny":
        return "tiny"
    path = Path(pretrained)
    if not path.exists():
        raise HakubooruError(f"pretrained model not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
              desc="hashing base model", leave=False) as bar:
        for file in files:
            if file != path:
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()
