"""A trained LoKr gives the same outputs hooked in (training) and merged into the weights (in
memory, as a single file and as a folder). LyCORIS's own loaders: tests/test_lokr_file.py."""
import pytest
import torch

from hakubooru.errors import HakubooruError
from trainers.lokr.merge import build_parser, main, merge_lokr
from trainers.lokr.models import load_sdxl, save_sdxl, tiny_sdxl
from trainers.lokr.network import save_lokr
from tests.tiny_lokr import outputs, trained_lokr
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

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
