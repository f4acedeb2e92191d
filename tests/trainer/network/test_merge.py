"""A trained LoKr gives the same outputs hooked in (training) and merged into the weights (in
memory, as a single file and as a folder). LyCORIS's own loaders: tests/trainer/network/test_lokr_file.py."""
import pytest
import torch

from hakubooru.errors import HakubooruError
from trainers.lokr.network.merge import build_parser, main, merge_lokr
from trainers.lokr.sdxl.model import load_sdxl, save_sdxl, tiny_sdxl
from trainers.lokr.network.lokr import save_lokr
from tests.helpers.tiny_lokr import outputs, trained_lokr

# Merged and hooked-in forwards add the same delta to the same weights, but in a different
# order of float32 operations: allow 1e-5 where outputs are of order 1.
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoKr with non-zero weights (as after training), its file, and its outputs."""
    sdxl, network, expected = trained_lokr()
    path = save_lokr(network, tmp_path_factory.mktemp("lokr") / "lokr.safetensors", {"step": 5}, unet=sdxl.unet,
                     dtype="fp32")
    return path, expected


def assert_outputs_close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_merged_in_memory_gives_training_outputs(trained):
    path, expected = trained
    assert_outputs_close(outputs(merge_lokr(tiny_sdxl(seed=0), path)), expected)


@pytest.mark.slow
def test_merge_cli_single_file_and_folder(trained, tmp_path, capsys):
    path, expected = trained
    base = tmp_path / "base"
    save_sdxl(tiny_sdxl(seed=0), base)
    out_file = tmp_path / "merged.safetensors"
    assert main(["--pretrained", str(base), "--lokr", str(path), "--out", str(out_file), "--dtype", "fp32"]) == 0
    assert "merged" in capsys.readouterr().out
    assert_outputs_close(outputs(load_sdxl(out_file, config=base)), expected)
    out_dir = tmp_path / "merged"
    assert main(["--pretrained", str(base), "--lokr", str(path), "--out", str(out_dir), "--dtype", "fp32"]) == 0
    assert_outputs_close(outputs(load_sdxl(out_dir)), expected)
    # fp16 output: the same model within half precision
    half = tmp_path / "half.safetensors"
    main(["--pretrained", str(base), "--lokr", str(path), "--out", str(half)])
    got = outputs(load_sdxl(half, config=base))[0]
    torch.testing.assert_close(got, expected[0], rtol=0, atol=2e-2)
    with pytest.raises(HakubooruError, match="already exists"):
        main(["--pretrained", str(base), "--lokr", str(path), "--out", str(out_file)])
    with pytest.raises(HakubooruError, match="LoKr file not found"):
        main(["--pretrained", "tiny", "--lokr", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x")])


def test_merge_onto_the_builtin_tiny_model_keeps_the_lokr_metadata_but_its_tag_counts(trained, tmp_path):
    """--pretrained tiny is the built-in tiny model the tiny LoKr was trained on (seed 0): the
    merged file gives the training outputs. Its `lokr_metadata` is the LoKr's metadata as JSON
    without `ss_tag_frequency` (per-tag counts, bulky); --pretrained itself is required."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path, expected = trained
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tagged = tmp_path / "tagged.safetensors"
    save_file(load_file(path), tagged, metadata={**meta, "ss_tag_frequency": json.dumps({"d": {"1girl": 3}})})
    base = tmp_path / "base"  # configs of the tiny model, to load the single file back
    save_sdxl(tiny_sdxl(seed=0), base)
    out = tmp_path / "merged.safetensors"
    assert main(["--pretrained", "tiny", "--lokr", str(tagged), "--out", str(out), "--dtype", "fp32"]) == 0
    assert_outputs_close(outputs(load_sdxl(out, config=base)), expected)
    with safe_open(str(out), "pt") as f:
        merged = f.metadata()
    assert merged["base_model"] == "tiny" and merged["merged_lokr"] == "tagged.safetensors"
    assert json.loads(merged["lokr_metadata"]) == meta and meta["step"] == "5"
    with pytest.raises(SystemExit):
        main(["--lokr", str(tagged), "--out", str(tmp_path / "other.safetensors")])


def test_merge_help_describes_the_command():
    """`merge --help`: the description is the module docstring's first line."""
    assert "Fold a trained LoKr into SDXL's weights and write a full checkpoint." in \
        " ".join(build_parser().format_help().split())


def _lycoris_lokr(sdxl, *, full_matrix: bool, dim: int, alpha: float, seed: int, **kwargs):
    """A LoKr made and saved by LyCORIS itself (as sd-scripts + LyCORIS write them), random weights."""
    from lycoris.kohya import LycorisNetworkKohya

    LycorisNetworkKohya.apply_preset({"enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                                      "unet_target_name": [], "text_encoder_target_module": ["CLIPMLP"],
                                      "text_encoder_target_name": [], "module_algo_map": {}, "name_algo_map": {}})
    from trainers.lokr.network.lokr import kohya_text_encoders
    net = LycorisNetworkKohya(kohya_text_encoders(sdxl), sdxl.unet, multiplier=1.0, lora_dim=dim, conv_lora_dim=dim,
                              alpha=alpha, conv_alpha=alpha, network_module="lokr", factor=4, full_matrix=full_matrix,
                              decompose_both=False, **kwargs)
    net.apply_to(None, None, apply_text_encoder=True, apply_unet=True)  # registers the modules: state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("full_matrix, dim, alpha", [(True, 10000, 10000.0), (False, 2, 1.0), (False, 4, 8.0)])
def test_merge_adds_kron_w1_w2_times_alpha_over_dim_once(tmp_path, full_matrix, dim, alpha):
    """merged - base = kron(w1, w2) · scale for every module, computed here by hand from the file's
    own tensors: scale 1 for full matrix, alpha / dim for low rank (w2 = w2_a @ w2_b). LyCORIS's
    own merge_to applies alpha / dim twice (0.5x of the delta at alpha 1, dim 2)."""
    from safetensors.torch import load_file

    net = _lycoris_lokr(tiny_sdxl(seed=0), full_matrix=full_matrix, dim=dim, alpha=alpha, seed=1)
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})  # LyCORIS's writer
    file = load_file(path)
    assert any(k.endswith("lokr_w2_a") for k in file) != full_matrix  # low rank is what it says
    base, merged = tiny_sdxl(seed=0), merge_lokr(tiny_sdxl(seed=0), path)
    weights = {**{f"lora_unet_{n}".replace(".", "_"): m.weight for n, m in merged.unet.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}}
    before = {f"lora_unet_{n}".replace(".", "_"): m.weight for n, m in base.unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for te, (b, m) in {"te1": (base.text_encoder_1, merged.text_encoder_1),
                       "te2": (base.text_encoder_2, merged.text_encoder_2)}.items():
        for (n, mod), (_, mod2) in zip(b.named_modules(), m.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                name = f"lora_{te}_{'' if n.startswith('text_model') else 'text_model_'}{n}".replace(".", "_")
                before[name], weights[name] = mod.weight, mod2.weight
    modules = {k.split(".")[0] for k in file}
    assert len(modules) > 50
    for name in modules:
        shape, w1, w2 = before[name].shape, file[f"{name}.lokr_w1"], file.get(f"{name}.lokr_w2")
        scale = 1.0  # a full w2 (LyCORIS stores one where dim ≥ half the side, whatever full_matrix says)
        if w2 is None:  # low rank: w2 = w2_a @ w2_b, a conv's kernel folded into w2_b's columns
            w2_a, w2_b = file[f"{name}.lokr_w2_a"], file[f"{name}.lokr_w2_b"]
            w2 = (w2_a @ w2_b.flatten(1)).reshape(w2_a.shape[0], -1, *shape[2:])
            assert w2_b.shape[0] == dim and float(file[f"{name}.alpha"]) == alpha
            scale = alpha / dim
        conv = len(shape) == 4  # kron over the first two dimensions; the kernel comes from w2
        want = torch.kron(w1[:, :, None, None] if conv else w1, w2) * scale
        torch.testing.assert_close(weights[name] - before[name], want, rtol=0, atol=1e-6)


def test_a_dora_lokr_is_refused_in_one_line(tmp_path):
    """A weight-decomposed (DoRA) LoKr merges by another rule than w1 ⊗ w2: refused, naming the file."""
    net = _lycoris_lokr(tiny_sdxl(seed=0), full_matrix=True, dim=10000, alpha=10000.0, seed=1, weight_decompose=True)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    with pytest.raises(HakubooruError, match=r"dora\.safetensors: lora_\w+ is a DoRA LoKr \(dora_scale\)"):
        merge_lokr(tiny_sdxl(seed=0), path)
