"""What a base model predicts (ε or v) and whether its noise schedule ends at zero SNR, read from
the base itself; the training target and the min-SNR weights that follow from it.

A diffusers folder says it in ``scheduler/scheduler_config.json`` (``prediction_type``,
``rescale_betas_zero_snr``); a single file carries the (empty) tensors ``v_pred`` and ``ztsnr``
that ComfyUI and sd-webui read (NoobAI-XL V-Pred and others). ``model.prediction_type`` and
``model.zero_terminal_snr`` = ``"auto"`` take what the base says; an explicit value wins, with a
warning when it contradicts the base.

Zero-terminal SNR (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed")
rescales the betas so that ᾱ at the last timestep is 0: diffusers' ``rescale_betas_zero_snr``
does it, in the training schedule and in every sampler built from its config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hakubooru.errors import HakubooruError

EPSILON, V_PREDICTION = "epsilon", "v_prediction"
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # single-file tensors ComfyUI / sd-webui read
MODELSPEC_TYPES = {EPSILON: "epsilon", V_PREDICTION: "v"}  # modelspec.prediction_type (sd-scripts' values)


@dataclass(frozen=True)
class Prediction:
    """A model's prediction type and noise schedule; ``source`` says where they were read."""

    type: str = EPSILON
    zero_terminal_snr: bool = False
    source: str = "the default (ε, SDXL's schedule)"

    def describe(self) -> str:
        ztsnr = "zero-terminal SNR" if self.zero_terminal_snr else "SDXL's schedule (terminal SNR > 0)"
        return f"{self.type}, {ztsnr}"


def detect(pretrained: str, config: str = "") -> Prediction:
    """What the base ``pretrained`` says: "tiny" is ε; a diffusers folder's scheduler config;
    a single file's ``v_pred`` / ``ztsnr`` keys (else ``modelspec.prediction_type`` = "v" in its
    metadata, else the scheduler config of ``config``, the single file's config folder, if given)."""
    if str(pretrained) in ("", "tiny"):
        return Prediction(source="the built-in tiny model")
    path = Path(pretrained)
    if path.is_dir():
        return _from_scheduler_config(path / "scheduler" / "scheduler_config.json")
    if path.suffix != ".safetensors" or not path.is_file():
        return Prediction(source=f"{path} (not read)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
    except Exception:  # noqa: BLE001 - the loader names a damaged file in its own line
        return Prediction(source=f"{path} (unreadable)")
    v = V_PRED_KEY in keys or meta.get("modelspec.prediction_type") in ("v", V_PREDICTION)
    z = ZTSNR_KEY in keys
    if v or z:
        found = [k for k in (V_PRED_KEY, ZTSNR_KEY) if k in keys] or ["modelspec.prediction_type"]
        return Prediction(V_PREDICTION if v else EPSILON, z, f"{path.name}: {', '.join(found)} key")
    if config:
        folder = _from_scheduler_config(Path(config) / "scheduler" / "scheduler_config.json")
        if folder.type != EPSILON or folder.zero_terminal_snr:
            return folder
    return Prediction(source=f"{path.name}: no v_pred / ztsnr key")


def _from_scheduler_config(path: Path) -> Prediction:
    try:
        sc = json.loads(path.read_text())
    except (OSError, ValueError):
        return Prediction(source=f"{path} (unreadable)")
    kind = sc.get("prediction_type", EPSILON)
    if kind not in (EPSILON, V_PREDICTION):
        raise HakubooruError(f"{path}: prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    return Prediction(kind, bool(sc.get("rescale_betas_zero_snr", False)), str(path))


def resolve(model_cfg: dict, found: Prediction) -> tuple[Prediction, list[str]]:
    """The prediction a run trains with: ``model.prediction_type`` / ``model.zero_terminal_snr``,
    "auto" = what the base says (``found``). Returns it and the lines to print first (what was
    found, and a warning per explicit setting that contradicts the base)."""
    kind, ztsnr = model_cfg["prediction_type"], model_cfg["zero_terminal_snr"]
    lines = [f"base model: {found.describe()} (from {found.source})"]
    if kind == "auto":
        kind = found.type
    elif kind != found.type:
        lines.append(f"warning: model.prediction_type = {kind!r} contradicts the base ({found.type}, from "
                     f"{found.source}); training with {kind}")
    if ztsnr == "auto":
        ztsnr = found.zero_terminal_snr
    elif ztsnr != found.zero_terminal_snr:
        lines.append(f"warning: model.zero_terminal_snr = {str(ztsnr).lower()} contradicts the base "
                     f"({str(found.zero_terminal_snr).lower()}, from {found.source}); training with "
                     f"{str(ztsnr).lower()}")
    if ztsnr and kind == EPSILON:
        raise HakubooruError("zero-terminal SNR needs v-prediction (at SNR 0 an ε-model cannot recover the image): "
                             "set model.prediction_type = \"v_prediction\" or model.zero_terminal_snr = false")
    chosen = Prediction(kind, bool(ztsnr), "config" if (kind, ztsnr) != (found.type, found.zero_terminal_snr)
                        else found.source)
    if len(lines) > 1 or model_cfg["prediction_type"] != "auto" or model_cfg["zero_terminal_snr"] != "auto":
        lines.append(f"training target: {chosen.describe()}")
    return chosen, lines


def scheduler_options(prediction: Prediction) -> dict:
    """The diffusers scheduler config keys of ``prediction``."""
    return {"prediction_type": prediction.type, "rescale_betas_zero_snr": prediction.zero_terminal_snr}


def of_scheduler(scheduler) -> Prediction:
    """The prediction a diffusers scheduler is configured for."""
    c = scheduler.config
    return Prediction(c.get("prediction_type", EPSILON), bool(c.get("rescale_betas_zero_snr", False)),
                      "the scheduler config")


def prediction_keys(prediction: Prediction) -> dict[str, torch.Tensor]:
    """The single-file tensors that mark a v-prediction / zero-terminal-SNR model for ComfyUI and
    sd-webui (empty: only their presence counts), as NoobAI-XL V-Pred's file carries them."""
    keys = [V_PRED_KEY] if prediction.type == V_PREDICTION else []
    return {k: torch.zeros(0) for k in keys + ([ZTSNR_KEY] if prediction.zero_terminal_snr else [])}


def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output: the noise ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀ (diffusers' ``get_velocity``)."""
    kind = scheduler.config.prediction_type
    if kind == EPSILON:
        return noise
    if kind == V_PREDICTION:
        return scheduler.get_velocity(latents, noise, timesteps)
    raise HakubooruError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str = EPSILON) -> torch.Tensor:
    """Min-SNR-γ loss weights, SNR = ᾱ / (1 − ᾱ): min(SNR, γ) / SNR for ε (1 where SNR ≤ γ, its
    limit, so SNR = 0 is weight 1, never 0/0), min(SNR, γ) / (SNR + 1) for v (as sd-scripts'
    ``apply_snr_weight(v_prediction=True)``; 0 at SNR = 0). γ = 0 turns it off (weight 1)."""
    alpha_bar = alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    if gamma == 0:
        return torch.ones_like(snr, dtype=torch.float32)
    if prediction_type == V_PREDICTION:
        return (snr.clamp(max=gamma) / (snr + 1)).float()
    above = snr > gamma
    return torch.where(above, gamma / torch.where(above, snr, torch.ones_like(snr)), torch.ones_like(snr)).float()


def sampler_config(scheduler_class, training_scheduler) -> dict:
    """The config a sampler of ``scheduler_class`` is built from: the training schedule's, with
    "trailing" timesteps under zero-terminal SNR (Lin et al. §3.3: sampling starts at the last
    timestep, SNR 0). A sampler that cannot rescale its betas is refused in one line."""
    import inspect

    config = dict(training_scheduler.config)
    if config.get("rescale_betas_zero_snr"):
        if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
            raise HakubooruError(f"sample.sampler = {scheduler_class.__name__!r} has no zero-terminal-SNR schedule "
                                 "(rescale_betas_zero_snr); use EulerDiscreteScheduler, "
                                 "EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler or "
                                 "UniPCMultistepScheduler")
        config["timestep_spacing"] = "trailing"
        # diffusers drops the keys it lists as defaults when building another class from a config
        config["_use_default_values"] = [k for k in config.get("_use_default_values", []) if k != "timestep_spacing"]
    return config
