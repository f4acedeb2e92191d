"""The LoKr file as other tools see it: sd-scripts names on the real SDXL checkpoint, LyCORIS's
own loaders (kohya wrapper and generic) in a fresh process, both namings, the converter, the
metadata sd-scripts writes, reproducible bytes, and continuing from a LoKr (--init-lokr)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from hakubooru.errors import HakubooruError
from tests.helpers import REPO, FIXTURES
from tests.helpers.shards import make_test_shards
from trainers.lokr.network import naming
from trainers.lokr.config import load_config
from trainers.lokr.network.convert import main as convert_main
from trainers.lokr.sdxl.model import load_sdxl, save_sdxl, sdxl_on_meta, tiny_sdxl
from trainers.lokr.network.lokr import create_lokr, init_from_lokr, load_lokr, lokr_state_dict, save_lokr
from tests.helpers.tiny_lokr import FACTORS, outputs, trained_lokr

KEYS_FILE = FIXTURES / "sdxl_base_1.0_keys.txt"  # facts about the published file
TOL = dict(rtol=0, atol=1e-5)  # hooked-in vs merged: the same sums in another float32 order


def published_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the published SDXL base 1.0 single file with its shape."""
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            out[key] = () if shape == "scalar" else tuple(int(x) for x in shape.split("x"))
    return out


def implied_shape(w1: torch.Size, w2: torch.Size) -> tuple[int, ...]:
    """The weight shape a full-matrix LoKr w1 ⊗ w2 stands for: (a·c, b·d[, kernel])."""
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


# ---------------------------------------------------------------- names on the real architecture


@pytest.fixture(scope="module")
def epsilon_on_meta():
    sdxl = sdxl_on_meta()
    network = create_lokr(sdxl, load_config("epsilon")["lokr"])
    return sdxl, network


def test_every_epsilon_module_maps_one_to_one_onto_the_published_checkpoint(epsilon_on_meta):
    sdxl, network = epsilon_on_meta
    keys = published_keys()
    shapes = {lora.lora_name: implied_shape(lora.lokr_w1.shape, lora.lokr_w2.shape) if hasattr(lora, "lokr_w1")
              else tuple(lora.w_norm.shape) for lora in network.loras}  # norm offsets: one per channel
    assert len(shapes) == 1314
    names = naming.unet_names(sdxl.unet)
    ours = {names.get(n, n): s for n, s in shapes.items()}  # sd-scripts naming
    # An independent derivation of sd-scripts' UNet names from the published key list alone:
    # "lora_unet_" + the checkpoint path of the weight with "_" for ".".
    from_keys = {"lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
                 for k in keys if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    unet_names = [n for n in ours if n.startswith("lora_unet_")]
    assert len(unet_names) == 1050 and set(unet_names) <= from_keys
    used, paths = {}, naming.ldm_paths(sdxl.unet)
    for name, shape in ours.items():
        key, part = naming.checkpoint_target(name, paths)
        assert key in keys, name
        if part is None:
            assert keys[key] == shape, (name, key)
        else:  # text encoder 2's q, k, v: the three thirds of in_proj_weight (3·1280 x 1280)
            assert keys[key] == (3 * shape[0], shape[1]), (name, key)
        assert (key, part) not in used, f"{name} and {used[key, part]} both map to {key}"
        used[key, part] = name
    assert len(used) == 1314
    fused = [k for k in keys if k.endswith("attn.in_proj_weight")]
    assert len(fused) == 32 and all({(k, 0), (k, 1), (k, 2)} <= used.keys() for k in fused)
    # spot checks against sd-scripts' names, written out by hand
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_unet_output_blocks_8_0_skip_connection", "lora_unet_middle_block_2_out_layers_3",
                 "lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_31_mlp_fc2"):
        assert name in ours, name


def test_diffusers_names_map_through_the_converter(epsilon_on_meta):
    sdxl, network = epsilon_on_meta
    state = {f"{lora.lora_name}.lokr_w1": torch.zeros(1) for lora in network.loras}
    assert naming.detect({naming.module_name(k) for k in state}) == "diffusers"
    converted = naming.to_naming(state, sdxl.unet, "sd-scripts")
    assert naming.detect({naming.module_name(k) for k in converted}) == "sd-scripts"
    back, found = naming.to_diffusers(converted, sdxl.unet)
    assert found == "sd-scripts" and back == state
    keys = published_keys()
    paths = naming.ldm_paths(sdxl.unet)
    mapped = {naming.checkpoint_target(naming.module_name(k), paths)[0] for k in converted}
    assert mapped <= keys.keys() and len(converted) == 1314
    with pytest.raises(ValueError, match="mixed LoKr naming"):
        naming.detect(["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_input_blocks_1_0_in_layers_2"])


def test_single_file_layout_is_the_published_one():
    """What `merge` and `save_sdxl_single_file` write: exactly the published names and shapes."""
    from trainers.lokr.sdxl.ldm import single_file_state

    state = single_file_state(sdxl_on_meta())
    assert {k: tuple(v.shape) for k, v in state.items()} == published_keys()
    assert state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]


# ---------------------------------------------------------------- loaders, on the tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoKr with non-zero weights saved in both namings, and its training outputs."""
    folder = tmp_path_factory.mktemp("lokr_files")
    sdxl, network, (expected, _, _) = trained_lokr()
    files = {n: save_lokr(network, folder / f"{n}.safetensors", {"step": 5}, unet=sdxl.unet, dtype="fp32", naming=n)
             for n in naming.NAMINGS}
    return files, expected, lokr_state_dict(network)


LOADER_SCRIPT = r'''
import json, sys, torch
from safetensors.torch import load_file
import lycoris
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.network.lokr import TextModelView, lokr_preset
from tests.helpers.tiny_lokr import outputs

kind, path, factors = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sdxl = tiny_sdxl(seed=0)
te = [TextModelView(sdxl.text_encoder_1), sdxl.text_encoder_2]
if kind == "kohya":
    # As sd-scripts calls it (--network_module lycoris.kohya --network_weights FILE). On a diffusers
    # UNet, LyCORIS's default preset wraps time_embedding twice: set the LoKr's own preset first.
    LycorisNetworkKohya.apply_preset(lokr_preset(sdxl, {"factors": factors}))
    network, weights = create_network_from_weights(1.0, path, sdxl.vae, te, sdxl.unet)
    loaded = len(network.unet_loras) + len(network.text_encoder_loras)
    network.apply_to(te, sdxl.unet, True, True)
    # and merged into the weights, as sd-scripts' merge does
    merged = tiny_sdxl(seed=0)
    again, _ = create_network_from_weights(1.0, path, merged.vae, [TextModelView(merged.text_encoder_1),
                                           merged.text_encoder_2], merged.unet)
    again.merge_to([TextModelView(merged.text_encoder_1), merged.text_encoder_2], merged.unet, weights,
                   torch.float32, "cpu")
    merged = outputs(merged)[0]
else:
    # As a diffusers user: one module holding unet / te1 / te2, and LyCORIS's "lycoris_" prefix.
    holder = torch.nn.Module()
    holder.unet, holder.te1, holder.te2 = sdxl.unet, te[0], te[1]
    weights = {"lycoris_" + k.removeprefix("lora_"): v for k, v in load_file(path).items()}
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, holder, weights_sd=weights)
    loaded = len(network.loras)
    network.apply_to()
    merged = None
in_file = len({k.split(".")[0] for k in weights})
hooked = outputs(sdxl)[0]
torch.save({"loaded": loaded, "in_file": in_file, "hooked": hooked, "merged": merged}, sys.argv[4])
'''


def run_python(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("kind", ["kohya", "generic"])
@pytest.mark.slow
def test_lycoris_loaders_in_a_fresh_process(trained, tmp_path, kind):
    files, expected, _ = trained
    script = tmp_path / "load.py"
    script.write_text(LOADER_SCRIPT)
    # the diffusers-naming file loads directly; the sd-scripts file through our converter
    converted = tmp_path / "converted.safetensors"
    r = run_python(["-m", "trainers.lokr", "convert", "--lokr", str(files["sd-scripts"]), "--to", "diffusers",
                    "--out", str(converted), "--pretrained", "tiny"])
    assert r.returncode == 0, r.stderr
    assert "(sd-scripts naming) ->" in r.stdout and "(diffusers naming, 186 modules)" in r.stdout
    for path in (files["diffusers"], converted):
        out = tmp_path / "result.pt"
        r = run_python([str(script), kind, str(path), json.dumps(FACTORS), str(out)])
        assert r.returncode == 0, r.stderr[-3000:]
        result = torch.load(out)
        assert result["in_file"] == 186 and result["loaded"] == 186  # a loader matching nothing fails here
        torch.testing.assert_close(result["hooked"], expected, **TOL)
        if kind == "kohya":
            torch.testing.assert_close(result["merged"], expected, **TOL)


def test_generic_loader_matches_nothing_of_an_sd_scripts_file_without_the_converter(trained):
    """Why the converter exists: LyCORIS names modules by the tree it walks."""
    import lycoris
    from trainers.lokr.network.lokr import TextModelView

    files, _, _ = trained
    sdxl = tiny_sdxl(seed=0)
    holder = torch.nn.Module()
    holder.unet, holder.te1, holder.te2 = sdxl.unet, TextModelView(sdxl.text_encoder_1), sdxl.text_encoder_2
    weights = {"lycoris_" + k.removeprefix("lora_"): v for k, v in load_file(files["sd-scripts"]).items()}
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, holder, weights_sd=weights)
    assert len(network.loras) == 36  # the text encoders only: UNet names do not match a diffusers UNet


def test_our_loader_reads_both_namings_and_says_which(trained, capsys):
    files, expected, _ = trained
    for n, path in files.items():
        sdxl = tiny_sdxl(seed=0)
        load_lokr(sdxl, path)
        assert f"186 LoKr modules, {n} naming" in capsys.readouterr().err
        torch.testing.assert_close(outputs(sdxl)[0], expected, rtol=0, atol=0)


def test_convert_round_trip_gives_the_same_bytes(trained, tmp_path):
    files, _, _ = trained
    there, back = tmp_path / "d.safetensors", tmp_path / "s.safetensors"
    assert convert_main(["--lokr", str(files["sd-scripts"]), "--to", "diffusers", "--out", str(there),
                         "--pretrained", "tiny"]) == 0
    with safe_open(str(there), "pt") as f:
        assert f.metadata()["lokr_naming"] == "diffusers"
    assert convert_main(["--lokr", str(there), "--to", "sd-scripts", "--out", str(back), "--pretrained", "tiny"]) == 0
    assert back.read_bytes() != files["sd-scripts"].read_bytes()  # lokr_naming was not in the trained file's metadata
    with safe_open(str(back), "pt") as f, safe_open(str(files["sd-scripts"]), "pt") as g:
        assert {k: f.get_tensor(k) for k in f.keys()}.keys() == set(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in g.keys())
    with pytest.raises(HakubooruError, match="already exists"):
        convert_main(["--lokr", str(there), "--to", "sd-scripts", "--out", str(back)])


def test_convert_cli_defaults_to_sdxl_and_needs_a_lokr(tmp_path, capsys):
    """`convert` without --pretrained renames on the SDXL 1.0 base architecture: sd-scripts'
    input_blocks.4.1 is diffusers' down_blocks.1.attentions.0 (input block 0 is conv_in, 1-2
    the first level's resnets, 3 its downsampler). --lokr is required; --pretrained other
    than sdxl / tiny is one line."""
    from safetensors.torch import save_file

    src = tmp_path / "one.safetensors"
    module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # a 640 -> 640 Linear
    save_file({f"{module}.alpha": torch.tensor(10000.0), f"{module}.lokr_w1": torch.ones(4, 4),
               f"{module}.lokr_w2": torch.ones(160, 160)}, str(src), {"ss_network_module": "lycoris.kohya"})
    out = tmp_path / "one-diffusers.safetensors"
    assert convert_main(["--lokr", str(src), "--to", "diffusers", "--out", str(out)]) == 0
    renamed = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert set(load_file(out)) == {f"{renamed}.alpha", f"{renamed}.lokr_w1", f"{renamed}.lokr_w2"}
    assert capsys.readouterr().out.strip() == f"{src} (sd-scripts naming) -> {out} (diffusers naming, 1 modules)"
    with pytest.raises(HakubooruError, match="""--pretrained must be "sdxl" or "tiny", got 'sdxl-base'"""):
        convert_main(["--lokr", str(src), "--to", "diffusers", "--out", str(tmp_path / "x.safetensors"),
                      "--pretrained", "sdxl-base"])
    with pytest.raises(SystemExit) as exit_:
        convert_main(["--to", "diffusers", "--out", str(tmp_path / "y.safetensors"), "--pretrained", "tiny"])
    assert exit_.value.code == 2 and "the following arguments are required: --lokr" in capsys.readouterr().err


# ---------------------------------------------------------------- merge, in a fresh process


@pytest.mark.parametrize("style", naming.NAMINGS)
@pytest.mark.slow
def test_merge_cli_in_a_fresh_process(trained, tmp_path, style):
    files, expected, _ = trained
    out = tmp_path / "merged.safetensors"
    r = run_python(["-m", "trainers.lokr", "merge", "--pretrained", "tiny", "--lokr", str(files[style]),
                    "--out", str(out), "--dtype", "fp32"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{style} naming" in r.stderr and "merged" in r.stdout
    config = tmp_path / "tiny-config"
    save_sdxl(tiny_sdxl(seed=0), config)
    torch.testing.assert_close(outputs(load_sdxl(out, config=config))[0], expected, **TOL)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        # the two keys sd-scripts' sai_model_spec always writes: this LoKr file has no resolution
        # of its own (saved outside a run), so SDXL's 1024²; the date in ISO 8601, UTC, whole seconds
        assert meta["modelspec.resolution"] == "1024x1024"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["modelspec.date"])
        assert f.get_tensor("conditioner.embedders.0.transformer.text_model.embeddings.position_ids").dtype == torch.int64


# ---------------------------------------------------------------- a training run's file


def run_cli(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", SOURCE_DATE_EPOCH="1700000000", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "trainers.lokr", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical 3-step tiny runs through the CLI, and the shard folder they trained on."""
    root = tmp_path_factory.mktemp("lokr_runs")
    shards = make_test_shards(root / "shards", n=16).dir
    outs = []
    for k in range(2):
        out = root / f"copy{k}" / "run"  # same folder name: it is in the metadata (ss_output_name)
        r = run_cli(["--config", "tiny", "--shards", str(shards), "--output", str(out), "--max-steps", "3"])
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out)
    return shards, outs


def caption_tag_counts(shards: Path) -> dict[str, int]:
    """sd-scripts' tag frequency, computed straight from the shards' .txt captions."""
    counts = {}
    for tar in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".txt"):
                    for tag in t.extractfile(m).read().decode().split(","):
                        if tag.strip():
                            counts[tag.strip().lower()] = counts.get(tag.strip().lower(), 0) + 1
    return counts


@pytest.mark.slow
def test_two_identical_runs_give_byte_identical_files_with_normal_permissions(runs):
    _, (a, b) = runs
    assert (a / "lokr.safetensors").read_bytes() == (b / "lokr.safetensors").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((a / "lokr.safetensors").stat().st_mode) == 0o666 & ~umask
    assert not [p for p in a.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_metadata_is_what_sd_scripts_writes(runs):
    shards, (a, _) = runs
    path = a / "lokr.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = load_config("tiny")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "10000" and meta["ss_network_alpha"] == "10000"
    # sd-scripts' form: the `--network_args key=value` strings, every value a string
    assert json.loads(meta["ss_network_args"]) == {
        "algo": "lokr", "preset": "lycoris_preset.toml", "full_matrix": "True", "factor": "-1", "conv_dim": "10000",
        "conv_alpha": "10000", "dropout": "0", "train_norm": "True", "bypass_mode": "True"}
    assert (a / "lycoris_preset.toml").read_text() == meta["lycoris_preset"]
    assert meta["ss_cache_latents"] == "False"  # this run encoded its images
    assert meta["ss_resolution"] == "(64, 64)"   # str() of sd-scripts' resolution tuple
    assert meta["ss_num_train_images"] == "16" and meta["ss_steps"] == "3" and meta["ss_epoch"] == "1"
    assert meta["ss_learning_rate"] == meta["ss_unet_lr"] == "0.001" and meta["ss_text_encoder_lr"] == "0.001"
    assert meta["ss_training_started_at"] == "1700000000.0"
    assert meta["ss_total_batch_size"] == "4" and meta["ss_gradient_accumulation_steps"] == "2"
    assert meta["ss_optimizer"] == "bitsandbytes.optim.lion.Lion8bit(weight_decay=0.1,betas=(0.9, 0.95))"
    assert json.loads(meta["ss_tag_frequency"]) == {"shards": caption_tag_counts(shards)}
    # the caption augmentation (recipe §2), as sd-scripts states it for the equivalent run: the
    # .txt of `export --keep-separator '|||'` with --shuffle_caption --keep_tokens_separator '|||'
    # --caption_tag_dropout_rate 0.15
    assert (meta["ss_shuffle_caption"], meta["ss_caption_tag_dropout_rate"], meta["ss_keep_tokens"]) == \
        ("True", "0.15", "0")
    (subset,) = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert (subset["shuffle_caption"], subset["keep_tokens"], subset["keep_tokens_separator"]) == (True, 0, "|||")
    assert (meta["captions_from"], meta["shuffle_scope"]) == ("record", "general")
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.title"] == "run"
    assert meta["modelspec.date"] == "2023-11-14T22:13:20+00:00"  # 1700000000 s after the epoch, by hand
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["base_model_sha256"] == "tiny" and meta["lokr_naming"] == "sd-scripts"
    assert meta["dataset_fingerprint"] == json.loads((shards / "manifest.json").read_text())["fingerprint"]
    assert json.loads(meta["config"])["lokr"]["factors"] == cfg["lokr"]["factors"]
    # sshs_model_hash: sha256 of the file after its header, as sd-webui computes it from the file
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    # sshs_legacy_hash: sd-scripts' own way, the safetensors library's serialization with ss_* only
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in tensors)


@pytest.mark.slow
def test_network_recreated_from_the_files_own_metadata(runs, tmp_path, monkeypatch):
    """As sd-scripts recreates a network: `lycoris.kohya.create_network(**network_args)` with the
    file's ss_network_args, the preset file its `preset=` names written from the file's
    `lycoris_preset` key; the file's weights then load into it with every module matched."""
    from lycoris.kohya import create_network

    from trainers.lokr.network.lokr import kohya_text_encoders

    _, (a, _) = runs
    with safe_open(str(a / "lokr.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    args = json.loads(meta["ss_network_args"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / args["preset"]).write_text(meta["lycoris_preset"])
    sdxl = tiny_sdxl(seed=0)
    network = create_network(1.0, int(meta["ss_network_dim"]), float(meta["ss_network_alpha"]), None,
                             kohya_text_encoders(sdxl), sdxl.unet, **args)
    network.apply_to(kohya_text_encoders(sdxl), sdxl.unet, True, True)  # as sd-scripts does before loading
    weights, found = naming.to_diffusers(tensors, sdxl.unet)
    assert found == "sd-scripts"
    result = network.load_state_dict(weights, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(network.loras) == len({naming.module_name(k) for k in weights})


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _webdataset(folder: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """One real tar of `samples` ({key: {ext: bytes}}), indexed as `python -m hakubooru index` does."""
    from hakubooru.wdsindex import index_webdataset

    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index_webdataset(folder, progress=False)
    return folder


def test_tag_frequency_metadata_by_hand(tmp_path):
    """ss_tag_frequency's counts: a caption record's groups where the sample has one (its .txt
    then unused), else the .txt split at commas, stripped, lower-cased; samples with neither are
    left out; most frequent first, ties by name. An empty .json is a damaged record: `index`
    refuses the folder in one line."""
    from trainers.lokr.data.index import load_index
    from trainers.lokr.network.metadata import tag_frequency

    record = {"id": 1, "keep": ["1girl"], "general": ["Smile", "sky"], "quality": [], "year": [], "meta": [],
              "rating_tags": []}
    folder = _webdataset(tmp_path / "wds", {
        "000001": {"png": _png(), "json": json.dumps(record).encode(), "txt": b"not, counted"},
        "000002": {"png": _png(), "txt": b" sky , 1girl,, Tree"},
        "000003": {"png": _png(), "json": b'{"url": "https://example.com/3.png"}', "txt": b"sky"},
        "000004": {"png": _png()},
    })
    counts = tag_frequency(folder, load_index(folder))
    # sky: samples 1, 2, 3; 1girl: 1, 2; smile: 1; tree: 2
    assert list(counts.items()) == [("sky", 3), ("1girl", 2), ("smile", 1), ("tree", 1)]
    assert (folder / "tag_counts.parquet").is_file()  # written by `index`, read by the trainer
    with pytest.raises(HakubooruError, match="sample 000005 in 00000.tar: its .json record is not valid JSON"):
        _webdataset(tmp_path / "damaged", {"000005": {"png": _png(), "json": b"", "txt": b"sky"}})


def test_dataset_and_model_hash_metadata_by_hand(tmp_path):
    """ss_dataset_dirs: each image once per epoch (n_repeats 1, sd-scripts' repeat count);
    ss_sd_model_hash of a single-file base model: sd-webui's old hash, the first 8 hex digits
    of the sha256 of the 64 KiB at offset 1 MiB."""
    from trainers.lokr.network.metadata import lokr_metadata

    base = tmp_path / "base.safetensors"
    data = bytes(range(256)) * 5127  # 1,312,512 bytes (1.25 MiB + 1,792): holds 1 MiB .. 1 MiB + 64 KiB
    base.write_bytes(data)
    cfg = load_config("tiny", [("model.pretrained", str(base))])
    meta = lokr_metadata(cfg, step=3, epoch=0, total_steps=3, batches_per_epoch=4, world_size=1,
                         num_train_images=16, dataset_dir="shards", tags={"sky": 2}, started_at=1700000000.0,
                         base_model_sha256="ab" * 32, dataset_fingerprint="xxh3_128:0", output_name="run",
                         config_json="{}", preset={"enable_conv": True})
    assert json.loads(meta["ss_dataset_dirs"]) == {"shards": {"n_repeats": 1, "img_count": 16}}
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == "ab" * 32
    assert json.loads(meta["ss_tag_frequency"]) == {"shards": {"sky": 2}}


def test_write_safetensors_that_cannot_be_written_is_one_line(tmp_path):
    """A failed write that is not a full disk (here a folder in the way of the file) names the
    path and the reason, and leaves no temporary file."""
    from trainers.lokr.safetensors_file import write_safetensors

    target = tmp_path / "lokr.safetensors"
    (target / "inside").mkdir(parents=True)  # a non-empty folder: the rename onto it fails
    with pytest.raises(HakubooruError) as err:
        write_safetensors(target, {"w": torch.zeros(4)}, {"step": "1"})
    assert str(err.value) == f"cannot write {target}: Is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lokr.safetensors"]


@pytest.mark.slow
def test_init_lokr_continues_from_a_file(runs, tmp_path):
    shards, (a, _) = runs
    # lr tiny: one Lion step moves each weight by lr·sign(update), far below fp32 resolution here
    out = tmp_path / "rev2"
    r = run_cli(["--config", "tiny", "--shards", str(shards), "--output", str(out), "--max-steps", "1",
                 "--init-lokr", str(a / "lokr.safetensors"), "--set", "optimizer.lr_unet=1e-30",
                 "--set", "optimizer.lr_text=1e-30", "--set", "lokr.save_dtype=\"fp16\""])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "initialised the LoKr from" in r.stderr and "sd-scripts naming" in r.stderr
    start, end = load_file(a / "lokr.safetensors"), load_file(out / "lokr.safetensors")
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    with safe_open(str(out / "lokr.safetensors"), "pt") as f:
        assert f.metadata()["init_from"] == str(a / "lokr.safetensors")
    # a config whose factors differ: refused, naming the tensor and both shapes
    r = run_cli(["--config", "tiny", "--shards", str(shards), "--output", str(tmp_path / "x"), "--max-steps", "1",
                 "--init-lokr", str(a / "lokr.safetensors"), "--set", "lokr.factors.Attention=4"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"error: .*lokr_w\d is \(\d+, \d+\) in the file but \(\d+, \d+\) with this config's factors",
                     r.stderr), r.stderr[-2000:]


def test_init_lokr_from_a_lycoris_written_file_and_refusals(tmp_path):
    """A file saved by LyCORIS's own network (as sd-scripts + LyCORIS write them), renamed to
    sd-scripts' UNet names: loaded exactly; other modules or low-rank files are refused."""
    sdxl = tiny_sdxl(seed=0)
    ours = create_lokr(sdxl, {"full_matrix": True, "factors": FACTORS})
    theirs = create_lokr(tiny_sdxl(seed=0), {"full_matrix": True, "factors": FACTORS})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    lyco = tmp_path / "lycoris.safetensors"
    theirs.save_weights(str(lyco), torch.float32, {"ss_network_module": "lycoris.kohya"})  # LyCORIS's writer
    renamed = tmp_path / "sd-scripts.safetensors"
    convert_main(["--lokr", str(lyco), "--to", "sd-scripts", "--out", str(renamed), "--pretrained", "tiny"])
    assert init_from_lokr(ours, sdxl, renamed) == "sd-scripts"
    assert all(torch.equal(a, b) for a, b in zip(lokr_state_dict(ours).values(), lokr_state_dict(theirs).values()))
    # without the text encoders: the file has modules the config does not wrap
    unet_only = create_lokr(tiny_sdxl(seed=0), {"full_matrix": True, "factors": FACTORS}, text_encoders=False)
    with pytest.raises(HakubooruError, match="has modules the config does not wrap, e.g. lora_te1_"):
        init_from_lokr(unet_only, sdxl, renamed)
    # a low-rank LoKr (w2 stored as w2_a @ w2_b, LyCORIS's form when full_matrix is off)
    weights = load_file(renamed)
    key = next(k for k in weights if k.endswith(".lokr_w2") and weights[k].ndim == 2)
    w2 = weights.pop(key)
    weights[key + "_a"], weights[key + "_b"] = w2[:, :1].contiguous(), torch.ones(1, w2.shape[1])
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / "low.safetensors"))
    with pytest.raises(HakubooruError, match="is a low-rank LoKr"):
        init_from_lokr(create_lokr(tiny_sdxl(seed=0), {"full_matrix": True, "factors": FACTORS}), sdxl,
                       tmp_path / "low.safetensors")


def test_caption_metadata_states_the_run_s_augmentation(tmp_path):
    """The ss_* keys sd-scripts writes for the caption augmentation (train_network.py:
    ss_shuffle_caption, ss_keep_tokens, ss_caption_tag_dropout_rate; keep_tokens_separator in
    ss_datasets' subsets): from records, the exported .txt's separator; from .txt captions,
    the separator and keep count the trainer read them with."""
    from trainers.lokr.data.batches import BatchDataset, BatchPlan, dataset_options
    from trainers.lokr.data.index import load_index
    from trainers.lokr.network.metadata import lokr_metadata

    def meta(cfg, captions_from):
        m = lokr_metadata(cfg, step=1, epoch=0, total_steps=1, batches_per_epoch=1, world_size=1,
                          num_train_images=2, dataset_dir="shards", tags={}, started_at=0.0,
                          base_model_sha256="", dataset_fingerprint="", output_name="run", config_json="{}",
                          preset={}, captions_from=captions_from)
        (subset,) = json.loads(m["ss_datasets"])[0]["subsets"]
        return (m["ss_shuffle_caption"], m["ss_caption_tag_dropout_rate"], m["ss_keep_tokens"],
                subset["keep_tokens_separator"], subset["shuffle_caption"], m["captions_from"])

    epsilon = load_config("epsilon")
    assert meta(epsilon, "record") == ("True", "0.15", "0", "|||", True, "record")
    assert meta(epsilon, "text") == ("True", "0.15", "0", "|||", True, "text")
    counted = load_config("epsilon", ["data.keep_tokens=3", "data.keep_separator=''",
                                      "data.shuffle_tags=false", "data.tag_dropout=0.0"])
    assert meta(counted, "text") == ("False", "0.0", "3", "", False, "text")
    assert meta(counted, "record") == ("False", "0.0", "0", "|||", False, "record")

    # which one a folder uses: read by the trainer's dataset, as a batch reads it
    records = make_test_shards(tmp_path / "records", n=4).dir
    texts = _webdataset(tmp_path / "wds", {f"{i:06d}": {"png": _png(), "txt": b"a ||| b, c"} for i in range(4)})
    cfg = load_config("tiny")
    for folder, want in ((records, "record"), (texts, "text")):
        index = load_index(folder)
        plan = BatchPlan(index, 1, 0, 0, [(64, 64)])
        assert BatchDataset(folder, index, plan, **dataset_options(cfg)).captions_from() == want
