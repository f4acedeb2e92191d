"""The metadata of a LoKr file: what sd-scripts writes (`ss_*`), the Stability model-spec keys
(`modelspec.*`), and our own (config, dataset fingerprint, base-model hash).

sd-webui reads `ss_base_model_version` to class a file as SDXL (without it the Lora page hides the
file while an SDXL model is loaded), model sites and metadata viewers read the rest. Names and
formats follow kohya-ss/sd-scripts (`train_network.py`, `library/train_util.py`,
`library/sai_model_spec.py`): every value is a string, Python's `str()` of the value (so
`"True"`, `"None"`, `"(1024, 1024)"`), JSON for the nested ones.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path

from hakubooru.tagcounts import ensure_tag_counts
from trainers.lokr.network.lokr import FULL_MATRIX_DIM
from trainers.lokr.sdxl.prediction import MODELSPEC_TYPES, Prediction
from trainers.lokr.sdxl.text import WINDOW

SDXL_BASE_VERSION = "sdxl_base_v1-0"       # sd-scripts' MODEL_VERSION_SDXL_BASE_V1_0
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
OPTIMIZER_CLASSES = {"Lion8bit": "bitsandbytes.optim.lion.Lion8bit", "AdamW": "torch.optim.adamw.AdamW",
                     "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit", "Prodigy": "prodigyopt.prodigy.Prodigy"}
OPTIMIZER_CLASS = OPTIMIZER_CLASSES["Lion8bit"]
SOURCE_DATE_ENV = "SOURCE_DATE_EPOCH"
PRESET_FILE = "lycoris_preset.toml"        # beside each LoKr of a run; ss_network_args' preset=


def training_start_time() -> float:
    """The time a run starts, for `ss_training_started_at` and `modelspec.date`: now, or
    `SOURCE_DATE_EPOCH` when set (the reproducible-builds convention), so that two identical
    runs can give byte-identical files. A resumed run keeps its first start time."""
    value = os.environ.get(SOURCE_DATE_ENV)
    return float(int(value)) if value and value.isdigit() else time.time()


def spec_date(seconds: float) -> str:
    """`modelspec.date`: the time in ISO 8601, UTC, whole seconds (e.g. 2023-11-14T22:13:20+00:00)."""
    return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).isoformat()


def legacy_model_hash(path: str | os.PathLike) -> str | None:
    """sd-webui's old model hash (`ss_sd_model_hash`): the first 8 hex digits of the sha256 of
    the 64 KiB at offset 1 MiB of a checkpoint file; None for a folder."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def tag_frequency(shards, index, *, workers: int = 4) -> dict[str, int]:
    """How many times each tag occurs in the captions, as sd-scripts counts a caption folder
    (each tag stripped, lower-cased), most frequent first: the folder's ``tag_counts.parquet``
    (hakubooru.tagcounts), counted once from the records if the build did not write it."""
    return ensure_tag_counts(shards, index.fingerprint, workers=workers)


def network_args(cfg: dict) -> dict[str, str]:
    """`ss_network_args`: the `--network_args` that recreate the network with
    `lycoris.kohya.create_network`, as sd-scripts stores them (`key=value` strings, so every
    value a string); `preset` names the preset file, whose text is the `lycoris_preset` key."""
    lokr = cfg["lokr"]
    return {"algo": "lokr", "preset": PRESET_FILE, "full_matrix": "True", "factor": "-1",
            "conv_dim": str(FULL_MATRIX_DIM), "conv_alpha": str(FULL_MATRIX_DIM), "dropout": "0",
            "train_norm": str(bool(lokr["train_norm"])), "bypass_mode": str(bool(lokr["bypass_mode"]))}


def preset_toml(preset: dict) -> str:
    """A LyCORIS preset as the TOML file its `preset=` network argument reads."""
    import toml  # LyCORIS's own dependency, which reads the file

    return toml.dumps(preset)


def caption_settings(cfg: dict, captions_from: str) -> tuple[int, str]:
    """(keep_tokens, keep_tokens_separator) of the sd-scripts run that augments captions as this
    run did. From `.txt` captions: the trainer's `data.keep_tokens` and `data.keep_separator`, which
    it reads them with. From the records: the `.txt` that `export --keep-separator SEP` writes
    (keep SEP general SEP quality, year, meta, rating) read with that separator, so 0 and
    `data.keep_separator` (`|||` when empty)."""
    dc = cfg["data"]
    if captions_from == "text":
        return dc["keep_tokens"], dc["keep_separator"]
    return 0, dc["keep_separator"] or "|||"


def lokr_metadata(cfg: dict, *, step: int, epoch: int, total_steps: int, batches_per_epoch: int,
                  world_size: int, num_train_images: int, dataset_dir: str, tags: dict[str, int],
                  started_at: float, base_model_sha256: str, dataset_fingerprint: str, output_name: str,
                  config_json: str, preset: dict, cache_latents: bool = False,
                  captions_from: str = "record", prediction: Prediction = Prediction()) -> dict[str, str]:
    """Every metadata string of a LoKr file written at optimizer step `step` (0-based `epoch`);
    `preset` is the network's LyCORIS preset (`network.lokr_preset`), `cache_latents` whether
    the run read VAE latents from the latent cache, `captions_from` whether its captions came
    from the caption records ("record") or the `.txt` ("text"; caption_settings), `prediction`
    what the run trained (ε or v, zero-terminal SNR)."""
    tc, dc, oc = cfg["train"], cfg["data"], cfg["optimizer"]
    keep_tokens, keep_separator = caption_settings(cfg, captions_from)
    pretrained = str(cfg["model"]["pretrained"])
    res = dc["resolution"]
    ss = {
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_v2": False,
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": FULL_MATRIX_DIM,
        "ss_network_alpha": FULL_MATRIX_DIM,
        "ss_network_dropout": 0.0,
        "ss_network_args": json.dumps(network_args(cfg)),
        "ss_training_started_at": started_at,
        "ss_output_name": output_name,
        "ss_learning_rate": oc["lr_unet"],
        "ss_unet_lr": oc["lr_unet"],
        "ss_text_encoder_lr": oc["lr_text"] if tc["train_text_encoders"] else None,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": -(-total_steps // max(1, batches_per_epoch // tc["grad_accum"])),
        "ss_batch_size_per_device": tc["batch_size"],
        "ss_total_batch_size": tc["batch_size"] * world_size * tc["grad_accum"],
        "ss_gradient_checkpointing": tc["gradient_checkpointing"],
        "ss_gradient_accumulation_steps": tc["grad_accum"],
        "ss_max_train_steps": total_steps,
        "ss_lr_warmup_steps": oc["warmup_steps"],
        "ss_lr_scheduler": {"constant": "constant_with_warmup"}.get(oc["schedule"], oc["schedule"]),
        "ss_optimizer": f"{OPTIMIZER_CLASSES[oc['name']]}(weight_decay={oc['weight_decay']},betas={tuple(oc['betas'])})",
        "ss_mixed_precision": tc["mixed_precision"],
        "ss_full_fp16": False,
        "ss_seed": tc["seed"],
        "ss_noise_offset": tc["noise_offset"],
        "ss_min_snr_gamma": tc["min_snr_gamma"],
        "ss_zero_terminal_snr": prediction.zero_terminal_snr,
        "ss_max_grad_norm": tc["max_grad_norm"],
        "ss_clip_skip": None,
        "ss_max_token_length": WINDOW * dc["max_windows"],
        "ss_cache_latents": cache_latents,
        "ss_resolution": (res, res),
        "ss_enable_bucket": True,
        "ss_min_bucket_reso": dc["bucket_min"],
        "ss_max_bucket_reso": dc["bucket_max"],
        "ss_random_crop": dc["random_crop"],
        "ss_flip_aug": False,
        "ss_color_aug": False,
        "ss_shuffle_caption": dc["shuffle_tags"],
        "ss_keep_tokens": keep_tokens,
        "ss_caption_dropout_rate": dc["caption_dropout"],
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_bucket_no_upscale": dc["bucket_no_upscale"],
        "ss_caption_tag_dropout_rate": dc["tag_dropout"],
        "ss_datasets": json.dumps([{
            "is_dreambooth": True, "batch_size_per_device": tc["batch_size"],
            "num_train_images": num_train_images, "num_reg_images": 0, "resolution": [res, res],
            "enable_bucket": True, "min_bucket_reso": dc["bucket_min"], "max_bucket_reso": dc["bucket_max"],
            "subsets": [{"img_count": num_train_images, "num_repeats": 1, "color_aug": False, "flip_aug": False,
                         "random_crop": dc["random_crop"], "shuffle_caption": dc["shuffle_tags"],
                         "keep_tokens": keep_tokens, "keep_tokens_separator": keep_separator,
                         "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None,
                         "caption_suffix": None, "image_dir": dataset_dir, "class_tokens": None,
                         "is_reg": False}]}]),
        "ss_tag_frequency": json.dumps({dataset_dir: tags}, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps({dataset_dir: {"n_repeats": 1, "img_count": num_train_images}}),
        "ss_sd_model_name": Path(pretrained).name,
        "ss_steps": step,
        "ss_epoch": epoch + 1,
    }
    if Path(pretrained).is_file():
        ss["ss_sd_model_hash"] = legacy_model_hash(pretrained)
        ss["ss_new_sd_model_hash"] = base_model_sha256
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.implementation_version": f"hakubooru/{_version()}",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": spec_date(started_at),
        "modelspec.prediction_type": MODELSPEC_TYPES[prediction.type],
        "modelspec.description": f"LyCORIS LoKr (full matrix) over SDXL 1.0 base, {step} steps, "
                                 f"{num_train_images} images",
    }
    ours = {"step": step, "config": config_json, "captions_from": captions_from,
            "shuffle_scope": dc["shuffle_scope"], "base_model": pretrained, "base_model_sha256": base_model_sha256,
            "dataset_fingerprint": dataset_fingerprint, "lokr_naming": cfg["lokr"]["naming"],
            "init_from": cfg["lokr"]["init_from"], "lycoris_preset": preset_toml(preset)}
    return {k: str(v) for k, v in {**ss, **spec, **ours}.items()}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hakubooru")
    except PackageNotFoundError:
        return "unknown"
