"""Prediction type and zero-terminal SNR: the v target, the rescaled betas and the min-SNR weights
against values computed by hand; what a base says (single-file keys, diffusers scheduler config);
explicit settings; the config keys."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from hakubooru.errors import HakubooruError
from trainers.lokr.config import load_config
from trainers.lokr.sdxl.model import training_scheduler
from trainers.lokr.sdxl.prediction import (EPSILON, V_PREDICTION, Prediction, detect, min_snr_weights,
                                           prediction_keys, resolve, sampler_config, target)

V_ZTSNR = Prediction(V_PREDICTION, True)


def hand_alpha_bar() -> list[float]:
    """SDXL's scaled-linear schedule in Python floats: β_i = (√0.00085 + i/999 (√0.012 − √0.00085))²,
    ᾱ_t = Π_{i≤t} (1 − β_i)."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    out, a = [], 1.0
    for i in range(1000):
        a *= 1 - (lo + i / 999 * (hi - lo)) ** 2
        out.append(a)
    return out


def hand_rescaled(alpha_bar: list[float]) -> list[float]:
    """Lin et al. Algorithm 1: √ᾱ shifted so the last is 0, scaled so the first is unchanged."""
    r0, rt = math.sqrt(alpha_bar[0]), math.sqrt(alpha_bar[-1])
    return [((math.sqrt(a) - rt) * r0 / (r0 - rt)) ** 2 for a in alpha_bar]


def test_rescaled_betas_end_at_zero_snr():
    plain, ztsnr = hand_alpha_bar(), hand_rescaled(hand_alpha_bar())
    # SDXL's own schedule ends at ᾱ = 0.00466 (SNR 0.0047, not 0): the flaw Lin et al. fix
    assert plain[999] == pytest.approx(0.0046601, rel=1e-4)
    assert ztsnr[0] == plain[0] and ztsnr[999] == 0.0
    assert ztsnr[500] == pytest.approx(0.2410188, rel=1e-5)  # (√0.276333 − √0.004660)·√0.99915/(√0.99915 − √0.004660), squared
    got = training_scheduler(prediction=V_ZTSNR).alphas_cumprod
    assert got[999].item() == 0.0  # exactly: SNR 0 at the last timestep
    assert got[[0, 250, 500, 998]].tolist() == pytest.approx([ztsnr[t] for t in (0, 250, 500, 998)], rel=1e-4)
    untouched = training_scheduler(prediction=Prediction(V_PREDICTION, False)).alphas_cumprod
    assert untouched[[0, 500, 999]].tolist() == pytest.approx([plain[t] for t in (0, 500, 999)], rel=1e-5)


def test_v_target_by_hand():
    a = hand_alpha_bar()
    x0 = torch.tensor([1.0, -0.5]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2).contiguous()
    eps = torch.tensor([2.0, 0.25]).reshape(2, 1, 1, 1).expand(2, 4, 2, 2).contiguous()
    t = torch.tensor([500, 20])
    # v = √ᾱ ε − √(1 − ᾱ) x₀
    expected = [math.sqrt(a[500]) * 2.0 - math.sqrt(1 - a[500]) * 1.0,
                math.sqrt(a[20]) * 0.25 - math.sqrt(1 - a[20]) * -0.5]
    assert expected[0] == pytest.approx(0.200663, abs=1e-5)  # 0.525674·2 − 0.850686
    v = target(training_scheduler(prediction=Prediction(V_PREDICTION)), x0, eps, t)
    assert v[:, 0, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(v, v[:, :1, :1, :1].expand_as(v))
    assert target(training_scheduler(), x0, eps, t) is eps  # ε-prediction: the noise itself
    # at SNR 0 (zero-terminal), v = −x₀: the model must produce the image from pure noise
    v_end = target(training_scheduler(prediction=V_ZTSNR), x0, eps, torch.tensor([999, 999]))
    assert torch.equal(v_end, -x0)


def test_min_snr_weights_v_form_and_zero_snr_by_hand():
    plain, ztsnr = hand_alpha_bar(), hand_rescaled(hand_alpha_bar())
    snr = lambda x: x / (1 - x)  # noqa: E731
    t = torch.tensor([0, 500, 999])
    # v form: min(SNR, γ) / (SNR + 1); t = 0: 5 / (1175.47 + 1) = 0.0042500
    v_plain = min_snr_weights(training_scheduler().alphas_cumprod, t, 5.0, V_PREDICTION)
    assert v_plain[0].item() == pytest.approx(5 / (1175.4706 + 1), rel=1e-4)
    assert v_plain.tolist() == pytest.approx([min(snr(plain[i]), 5) / (snr(plain[i]) + 1) for i in (0, 500, 999)],
                                             rel=1e-4)
    # zero-terminal SNR: below γ the v weight is SNR / (SNR + 1) = ᾱ, and 0 at SNR 0 (no 0/0)
    sched = training_scheduler(prediction=V_ZTSNR)
    v = min_snr_weights(sched.alphas_cumprod, t, 5.0, V_PREDICTION)
    assert v.tolist() == pytest.approx([5 / (snr(ztsnr[0]) + 1), ztsnr[500], 0.0], rel=1e-4)
    # ε form at SNR 0 is its limit 1 (min(SNR, γ) / SNR = 1 for every SNR ≤ γ), never NaN
    e = min_snr_weights(sched.alphas_cumprod, t, 5.0, EPSILON)
    assert torch.isfinite(e).all() and e[1:].tolist() == [1.0, 1.0]
    assert min_snr_weights(sched.alphas_cumprod, t, 0.0, V_PREDICTION).tolist() == [1.0] * 3


def test_detect_reads_single_file_keys_and_scheduler_config(tmp_path):
    assert detect("tiny") == Prediction(EPSILON, False, "the built-in tiny model")
    single = tmp_path / "noob-vpred.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2), "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, single)
    found = detect(str(single))
    assert (found.type, found.zero_terminal_snr) == (V_PREDICTION, True) and "v_pred, ztsnr key" in found.source
    plain = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, plain)
    assert (detect(str(plain)).type, detect(str(plain)).zero_terminal_snr) == (EPSILON, False)
    folder = tmp_path / "vpred-diffusers"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    assert (detect(str(folder)).type, detect(str(folder)).zero_terminal_snr) == (V_PREDICTION, True)
    assert prediction_keys(V_ZTSNR).keys() == {"v_pred", "ztsnr"} and prediction_keys(Prediction()) == {}


def test_resolve_auto_explicit_and_contradiction():
    base = Prediction(V_PREDICTION, True, "noob.safetensors: v_pred, ztsnr key")
    chosen, lines = resolve({"prediction_type": "auto", "zero_terminal_snr": "auto"}, base)
    assert (chosen.type, chosen.zero_terminal_snr) == (V_PREDICTION, True)
    assert lines == ["base model: v_prediction, zero-terminal SNR (from noob.safetensors: v_pred, ztsnr key)"]
    chosen, lines = resolve({"prediction_type": "v_prediction", "zero_terminal_snr": False}, base)
    assert (chosen.type, chosen.zero_terminal_snr) == (V_PREDICTION, False)
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1 and "model.zero_terminal_snr = false" in warnings[0] and "(true, from" in warnings[0]
    with pytest.raises(HakubooruError, match="zero-terminal SNR needs v-prediction"):
        resolve({"prediction_type": "epsilon", "zero_terminal_snr": "auto"}, base)
    chosen, lines = resolve({"prediction_type": "v_prediction", "zero_terminal_snr": "auto"}, Prediction())
    assert chosen.type == V_PREDICTION and "contradicts the base (epsilon" in lines[1]


def test_config_keys_default_to_auto_and_take_booleans():
    cfg = load_config("epsilon")
    assert (cfg["model"]["prediction_type"], cfg["model"]["zero_terminal_snr"]) == ("auto", "auto")
    cfg = load_config("tiny", ["model.zero_terminal_snr=true", "model.prediction_type=v_prediction"])
    assert cfg["model"]["zero_terminal_snr"] is True
    with pytest.raises(HakubooruError, match="'model.zero_terminal_snr' must be true, false or \"auto\""):
        load_config("tiny", ["model.zero_terminal_snr=1"])
    with pytest.raises(HakubooruError, match="model.prediction_type"):
        load_config("tiny", ["model.prediction_type=v"])


def test_samplers_follow_the_schedule_and_heun_is_refused():
    from diffusers import EulerAncestralDiscreteScheduler, HeunDiscreteScheduler

    sched = training_scheduler(prediction=V_ZTSNR)
    config = sampler_config(EulerAncestralDiscreteScheduler, sched)
    sampler = EulerAncestralDiscreteScheduler.from_config(config)
    assert sampler.config.prediction_type == V_PREDICTION and sampler.config.rescale_betas_zero_snr
    assert sampler.config.timestep_spacing == "trailing"
    sampler.set_timesteps(4)
    assert sampler.timesteps[0] == 999  # the first step is at SNR 0
    with pytest.raises(HakubooruError, match="HeunDiscreteScheduler"):
        sampler_config(HeunDiscreteScheduler, sched)
    assert sampler_config(HeunDiscreteScheduler, training_scheduler()) == dict(training_scheduler().config)
