"""Trainer configuration: TOML files layered on the epsilon recipe, command-line overrides, validation.

A config is a plain nested dict (``cfg["train"]["batch_size"]``). Every config starts from
``configs/epsilon.toml`` (the recipe); a bundled name or a TOML file then changes some keys, and
``--set section.key=value`` overrides change more. The key set and the type of every key come
from epsilon.toml, so a typo or a wrong type is one clear error line, never a silent default.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from hakubooru.errors import HakubooruError

CONFIG_DIR = Path(__file__).parent / "configs"
BUNDLED = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))

# Keys whose change cannot alter the result of a resumed run: accepted on resume without a flag.
FREE_ON_RESUME = {"data.workers", "validation.every", "train.ddp_timeout", "train.save_every", "train.keep_states", "train.checkpoint_every",
                  "train.max_nonfinite_in_row", "lokr.naming", "train.log_with", "sample.every", "sample.at_end",
                  "sample.sampler", "sample.width", "sample.height", "sample.steps", "sample.guidance",
                  "sample.negative_prompt", "sample.prompts"}
# What a state written before a key existed meant by it (the network before Kohaku XL Delta's
# groups: no norm offsets, the new groups not wrapped; captions before data.shuffle_scope: every
# tag after the keep group moved).
LEGACY_DEFAULTS = {"lokr.train_norm": False, "data.shuffle_scope": "all", "model.prediction_type": "auto",
                   "model.zero_terminal_snr": "auto", "optimizer.schedule": "constant", "optimizer.cycles": 1, "data.caption_dropout": 0.0,
                   "data.bucket_no_upscale": False, "ema.decay": 0.0, "ema.every": 1, "ema.device": "cpu",
                   "validation.samples": 0, "validation.every": 500, **{f"lokr.factors.{g}": 0 for g in (
    "Transformer2DModel", "Downsample2D", "Upsample2D", "conv_in_out", "embeddings")}}
# Keys that only decide how long the run goes on: accepted on resume with --allow-config-change.
SAFE_ON_RESUME = {"train.max_steps", "train.epochs"}

_CHOICES = {
    "model.prediction_type": ("auto", "epsilon", "v_prediction"),
    "train.mixed_precision": ("fp16", "bf16", "no"),
    "optimizer.name": ("Lion8bit", "AdamW", "AdamW8bit", "Prodigy"),
    "optimizer.schedule": ("constant", "cosine", "linear", "cosine_with_restarts"),
    "train.log_with": ("", "tensorboard", "wandb"),
    "lokr.save_dtype": ("fp16", "bf16", "fp32"),
    "lokr.naming": ("sd-scripts", "diffusers"),
    "sample.sampler": ("EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                       "DDIMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler"),
    "data.latent_cache": ("auto", "off", "require"),
    "data.on_corrupt": ("error", "skip"),
    "data.shuffle_scope": ("general", "all"),
    "ema.device": ("cpu", "gpu"),
}
# Keys that were replaced: refused with one line naming the new key.
REPLACED = {"data.protect_quality_year_rating": 'data.shuffle_scope ("general": only the general tags '
                                                 'move and drop, the card\'s rule; "all": every tag after the keep group)'}
_BOOL_OR_AUTO = {"model.zero_terminal_snr"}  # "auto" (from the base) or a boolean
# (dotted key, lowest allowed value, exclusive?)
_LOWER_BOUNDS = [
    ("data.resolution", 8, False), ("data.bucket_min", 8, False), ("data.bucket_max", 8, False),
    ("data.bucket_step", 8, False), ("data.tag_dropout", 0, False), ("data.caption_dropout", 0, False), ("data.max_windows", 1, False),
    ("data.workers", 0, False), ("data.keep_tokens", 0, False), ("data.vae_batch_size", 1, False),
    ("train.seed", 0, False), ("train.batch_size", 1, False),
    ("train.grad_accum", 1, False), ("train.epochs", 1, False), ("train.max_steps", 0, False),
    ("train.min_snr_gamma", 0, False), ("train.noise_offset", 0, False),
    ("train.max_grad_norm", 0, False), ("train.max_nonfinite_in_row", 1, False),
    ("train.save_every", 1, False), ("train.keep_states", 1, False),
    ("train.checkpoint_every", 1, False), ("train.ddp_timeout", 0, True), ("optimizer.lr_unet", 0, True),
    ("optimizer.lr_text", 0, True), ("optimizer.weight_decay", 0, False),
    ("optimizer.warmup_steps", 0, False), ("optimizer.cycles", 1, False),
    ("ema.decay", 0, False), ("ema.every", 1, False), ("validation.samples", 0, False), ("validation.every", 0, False), ("sample.every", 0, False),
]


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise HakubooruError(f"config file not found: {path} (bundled configs: {', '.join(BUNDLED)})") from None
    except tomllib.TOMLDecodeError as e:
        raise HakubooruError(f"config {path} is not valid TOML: {e}") from None


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}`` (nested tables become dotted keys)."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set(cfg: dict, dotted: str, value, schema: dict, origin: str) -> None:
    if dotted in REPLACED:
        raise HakubooruError(f"{origin}: config key '{dotted}' was replaced by {REPLACED[dotted]}")
    if dotted not in schema:
        close = difflib.get_close_matches(dotted, schema, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise HakubooruError(f"{origin}: unknown config key '{dotted}'{hint}")
    expected = schema[dotted]
    if dotted in _BOOL_OR_AUTO:
        ok = value == "auto" or isinstance(value, bool)
    elif isinstance(expected, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(expected, bool)
    elif isinstance(expected, float):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(expected))
    if not ok:
        kind = ("a finite float" if isinstance(expected, float) else "true, false or \"auto\""
                if dotted in _BOOL_OR_AUTO else type(expected).__name__)
        raise HakubooruError(f"{origin}: config key '{dotted}' must be {kind}, got {value!r}")
    *tables, key = dotted.split(".")
    node = cfg
    for t in tables:
        node = node[t]
    node[key] = value


def _apply(cfg: dict, layer: dict, schema: dict, origin: str) -> None:
    for dotted, value in flatten(layer).items():
        _set(cfg, dotted, value, schema, origin)


def parse_override(text: str):
    """``"train.batch_size=2"`` -> ``("train.batch_size", 2)``; the value is read as a TOML value
    (numbers, booleans, quoted strings, lists), falling back to the bare text as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise HakubooruError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def validate(cfg: dict) -> None:
    """Reject impossible values with one line naming the key."""
    flat = flatten(cfg)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise HakubooruError(f"config key '{key}' must be one of {', '.join(choices)} (got {flat[key]!r})")
    for key, low, exclusive in _LOWER_BOUNDS:
        if flat[key] < low or (exclusive and flat[key] == low):
            rel = ">" if exclusive else "≥"
            raise HakubooruError(f"config key '{key}' must be {rel} {low} (got {flat[key]!r})")
    if flat["train.seed"] >= 2**64:  # hash64 would wrap it silently
        raise HakubooruError(f"config key 'train.seed' must be < 2**64 (got {flat['train.seed']})")
    for key in ("data.resolution", "data.bucket_min", "data.bucket_max", "data.bucket_step"):
        if flat[key] % 8:
            raise HakubooruError(f"config key '{key}' must be a multiple of 8, the VAE's downscale (got {flat[key]})")
    if not flat["data.bucket_min"] <= flat["data.resolution"] <= flat["data.bucket_max"]:
        raise HakubooruError("config: need data.bucket_min ≤ data.resolution ≤ data.bucket_max "
                             f"(got {flat['data.bucket_min']}, {flat['data.resolution']}, {flat['data.bucket_max']})")
    if flat["ema.decay"] >= 1:
        raise HakubooruError(f"config key 'ema.decay' must be < 1, 0 = off (got {flat['ema.decay']})")
    if flat["data.caption_dropout"] > 1:
        raise HakubooruError(f"config key 'data.caption_dropout' must be ≤ 1 (got {flat['data.caption_dropout']})")
    if flat["data.tag_dropout"] >= 1:
        raise HakubooruError(f"config key 'data.tag_dropout' must be < 1 (got {flat['data.tag_dropout']})")
    betas = flat["optimizer.betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):  # also NaN
        raise HakubooruError(f"config key 'optimizer.betas' must be two numbers in [0, 1) (got {betas!r})")
    _validate_prompts(cfg["sample"])
    for key, value in flat.items():
        if key.startswith("lokr.factors.") and not (isinstance(value, int) and not isinstance(value, bool)
                                                    and value >= 0):
            raise HakubooruError(f"config key '{key}' must be an integer ≥ 0, 0 = not wrapped (got {value!r})")


# per-prompt keys of [sample] -> (type, lowest value)
_PROMPT_TYPES = {"prompt": (str, None), "negative_prompt": (str, None), "seed": (int, 0), "width": (int, 8),
                 "height": (int, 8), "steps": (int, 1), "guidance": (float, 0.0)}


def _validate_prompts(sample: dict) -> None:
    """Each ``[[sample.prompts]]`` table: a ``prompt``, and only known keys of the right type;
    sizes multiples of 8 (the VAE's downscale); the section's defaults checked the same way."""
    for i, p in enumerate([sample] + list(sample["prompts"])):
        where = "config [sample]" if i == 0 else f"config [[sample.prompts]] #{i}"
        if i and not isinstance(p, dict):
            raise HakubooruError(f"{where} must be a table with prompt = \"...\" (got {p!r})")
        if i and not isinstance(p.get("prompt"), str):
            raise HakubooruError(f"{where} needs prompt = \"...\"")
        unknown = sorted(set(p) - set(_PROMPT_TYPES)) if i else []
        if unknown:
            raise HakubooruError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(_PROMPT_TYPES)})")
        for key, (kind, low) in _PROMPT_TYPES.items():
            if key not in p:
                continue
            value = p[key]
            ok = isinstance(value, (int, float)) and math.isfinite(value) if kind is float else isinstance(value, kind)
            if isinstance(value, bool) or not ok or (low is not None and value < low):
                bound = f" ≥ {low}" if low is not None else ""
                raise HakubooruError(f"{where}: '{key}' must be {'a number' if kind is float else kind.__name__}"
                                     f"{bound} (got {value!r})")
            if key in ("width", "height") and value % 8:
                raise HakubooruError(f"{where}: '{key}' must be a multiple of 8 (got {value})")


def load_config(name_or_path: str = "epsilon", overrides=()) -> dict:
    """The epsilon recipe, changed by a bundled config (``"tiny"``) or a TOML file, then by
    ``overrides`` (``["train.batch_size=2", ...]`` or ``(key, value)`` pairs); validated."""
    cfg = _read_toml(CONFIG_DIR / "epsilon.toml")
    schema = flatten(cfg)
    path = CONFIG_DIR / f"{name_or_path}.toml" if name_or_path in BUNDLED else Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        raise HakubooruError(f"unknown config {name_or_path!r}: give a bundled name ({', '.join(BUNDLED)}) "
                             "or a path to a .toml file")
    if path != CONFIG_DIR / "epsilon.toml":
        _apply(cfg, _read_toml(path), schema, str(path))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        _set(cfg, key, value, schema, "--set")
    validate(cfg)
    return cfg


def config_json(cfg: dict) -> str:
    """Canonical JSON text of a config (sorted keys): stored in states and LoKr metadata."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def config_fingerprint(cfg: dict) -> str:
    """sha256 of the canonical config, leaving out the keys that never change a run's result."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in FREE_ON_RESUME}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def check_resume_config(saved: dict, cfg: dict, allow_change: bool, also_free=frozenset()) -> list[str]:
    """Refuse to resume a state written under another config. Returns the changed keys that
    were accepted; raises naming the keys that make the state unusable. ``also_free``: keys
    this resume may change (an elastic resume's per-GPU batch and accumulation)."""
    old, new = {**LEGACY_DEFAULTS, **flatten(saved)}, flatten(cfg)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    unsafe = [k for k in changed if k not in FREE_ON_RESUME | SAFE_ON_RESUME | set(also_free)]
    if unsafe:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in unsafe)
        raise HakubooruError(f"the state was written under another config ({detail}); resume with the "
                             "same config, or start a new run in another --output")
    flagged = [k for k in changed if k in SAFE_ON_RESUME]
    if flagged and not allow_change:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in flagged)
        raise HakubooruError(f"the config changed since the state was written ({detail}); pass "
                             "--allow-config-change to resume with it")
    return changed

