"""lokr.bypass_mode (LyCORIS applies w1, w2 to the input instead of building w1 ⊗ w2) changes
speed only: the same parameters, outputs and gradients within fp32 rounding, the same saved
file, and training states of the same layout."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.network.lokr import create_lokr, save_lokr
from trainers.lokr.state import load_latest_state, state_dir
from trainers.lokr.sdxl.text import encode_prompts
from trainers.lokr.train import train

FACTORS = {"Attention": 4, "FeedForward": 4, "ResnetBlock2D": 8, "CLIPAttention": 2, "CLIPMLP": 4}


def test_epsilon_default_is_bypass():
    assert load_config("epsilon")["lokr"]["bypass_mode"] is True


def lokr_outputs(bypass: bool, weights=None):
    sdxl = tiny_sdxl(seed=0)
    network = create_lokr(sdxl, {"full_matrix": True, "factors": FACTORS, "bypass_mode": bypass})
    assert all(bool(lora.bypass_mode) == bypass for lora in network.loras)
    if weights is None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            weights = {k: v + 0.05 * torch.randn(v.shape, generator=g) if "lokr" in k else v
                       for k, v in network.state_dict().items()}
    network.load_state_dict(weights)
    g = torch.Generator().manual_seed(7)
    context, pooled = encode_prompts(sdxl, ["1girl, solo, smile", "no humans, sky"])
    pred = sdxl.unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 900]), encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled,
                                        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}).sample
    pred.square().mean().backward()
    # (text encoder 1's last layer feeds nothing SDXL reads: no gradient there)
    grads = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    return network, weights, pred.detach(), grads


def test_same_parameters_outputs_gradients_and_file(tmp_path):
    rebuilt, weights, pred_a, grads_a = lokr_outputs(False)
    bypass, _, pred_b, grads_b = lokr_outputs(True, weights)
    assert rebuilt.state_dict().keys() == bypass.state_dict().keys()
    # the same sums in another order of fp32 operations: outputs of order 1, gradients smaller
    torch.testing.assert_close(pred_b, pred_a, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-4 * max(scale, 1e-6))
    unet = tiny_sdxl(seed=0).unet  # for the module names (sd-scripts naming)
    a = save_lokr(rebuilt, tmp_path / "a.safetensors", {"step": 1}, unet=unet, dtype="fp32")
    b = save_lokr(bypass, tmp_path / "b.safetensors", {"step": 1}, unet=unet, dtype="fp32")
    assert a.read_bytes() == b.read_bytes()  # the mode is not in the file


@pytest.mark.parametrize("steps", [2])
@pytest.mark.slow
def test_training_in_both_modes_writes_the_same_files(tmp_path, steps):
    shards = make_test_shards(tmp_path / "shards", n=16).dir
    files, states = {}, {}
    for bypass in (False, True):
        out = tmp_path / f"bypass-{bypass}"
        train(load_config("tiny", [f"train.max_steps={steps}", f"lokr.bypass_mode={str(bypass).lower()}"]), shards, out)
        files[bypass] = load_file(out / "lokr.safetensors")
        states[bypass] = load_latest_state(state_dir(out))[1]
    assert files[False].keys() == files[True].keys()
    for k in files[False]:
        assert files[False][k].dtype == files[True][k].dtype and files[False][k].shape == files[True][k].shape
        torch.testing.assert_close(files[True][k].float(), files[False][k].float(), rtol=1e-2, atol=1e-4)
    assert states[False].keys() == states[True].keys()
    assert states[False]["lokr"].keys() == states[True]["lokr"].keys()
    assert states[False]["optimizer"]["state"].keys() == states[True]["optimizer"]["state"].keys()
