"""Sample images during training ([sample]): the files appear as configured, and sampling leaves
the training bitwise untouched, with and without a resume in between."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hakubooru.errors import HakubooruError
from tests.shardfactory import make_test_shards
from tests.test_resume import tensors
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)
from trainers.lokr import models
from trainers.lokr.config import load_config
from trainers.lokr.sampling import contact_sheet, is_due, render
from trainers.lokr.state import load_latest_state, state_dir
from trainers.lokr.train import train

STEPS = ["train.max_steps=4", "train.save_every=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("sampling_shards"), n=20).dir


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling_runs")
    train(load_config("tiny", STEPS + ["sample.every=2"]), shards, tmp / "with")
    train(load_config("tiny", STEPS), shards, tmp / "without")
    # stopped at step 2 and resumed to 4, sampling all along
    train(load_config("tiny", ["train.max_steps=2", "train.save_every=2", "sample.every=2"]), shards,
          tmp / "resumed")
    train(load_config("tiny", STEPS + ["sample.every=2"]), shards, tmp / "resumed", resume=tmp / "resumed",
          allow_config_change=True)
    return tmp


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_leaves_training_bitwise_identical(runs):
    final = {name: load_file(runs / name / "lokr.safetensors") for name in ("with", "without", "resumed")}
    assert _same_tensors(final["with"], final["without"])
    assert _same_tensors(final["resumed"], final["without"])
    states = {name: tensors(load_latest_state(state_dir(runs / name))[1]) for name in ("with", "without")}
    assert _same_tensors(states["with"], states["without"])  # LoKr, optimizer, scaler
    # the losses too: sampling draws nothing from the training's random streams
    losses = {name: [json.loads(x)["loss"] for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("with", "without")}
    assert losses["with"] == losses["without"]


def test_sample_files_are_pngs_of_the_configured_sizes(runs):
    samples = runs / "with" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "00000002-0.png", "00000002-1.png", "00000002-sheet.png",
        "00000004-0.png", "00000004-1.png", "00000004-sheet.png"]
    # tiny.toml: prompt 0 at the section's 64×64, prompt 1 at its own 96×64; sheet: 2 cells of
    # the largest image (96×64) plus a 14-pixel label line each
    for name, size in (("00000004-0.png", (64, 64)), ("00000004-1.png", (96, 64)),
                       ("00000004-sheet.png", (192, 78))):
        with Image.open(samples / name) as im:
            assert im.format == "PNG" and im.size == size
            im.verify()
    lines = [json.loads(x) for x in (runs / "with" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert [x.get("samples") for x in lines] == [
        None, ["samples/00000002-0.png", "samples/00000002-1.png"], None,
        ["samples/00000004-0.png", "samples/00000004-1.png"]]
    assert lines[3]["sample_sheet"] == "samples/00000004-sheet.png"
    assert not (runs / "without" / "samples").exists()


def test_two_runs_give_identical_pngs(runs):
    # the resumed run rendered step 2 in its first process and step 4 in the second
    for name in ("00000002-0.png", "00000002-1.png", "00000004-0.png", "00000004-1.png", "00000004-sheet.png"):
        a = (runs / "with" / "samples" / name).read_bytes()
        assert a == (runs / "resumed" / "samples" / name).read_bytes(), name
    with Image.open(runs / "with" / "samples" / "00000002-0.png") as a, \
            Image.open(runs / "with" / "samples" / "00000004-0.png") as b:
        assert a.tobytes() != b.tobytes()  # the LoKr changed between steps 2 and 4, and so did the image


def test_bad_prompt_tables_are_one_line_errors():
    with pytest.raises(HakubooruError, match=r"\[\[sample.prompts\]\] #1: unknown key 'colour'"):
        load_config("tiny", ['sample.prompts=[{prompt = "a", colour = 1}]'])
    with pytest.raises(HakubooruError, match=r"#2 needs prompt"):
        load_config("tiny", ['sample.prompts=[{prompt = "a"}, {seed = 1}]'])
    with pytest.raises(HakubooruError, match="'height' must be a multiple of 8"):
        load_config("tiny", ['sample.prompts=[{prompt = "a", height = 60}]'])
    with pytest.raises(HakubooruError, match="'steps' must be int ≥ 1"):
        load_config("tiny", ["sample.steps=0"])
    with pytest.raises(HakubooruError, match="sample.sampler"):
        load_config("tiny", ['sample.sampler="euler"'])
    with pytest.raises(HakubooruError, match="no sample images"):
        contact_sheet([], [])


def test_tiling_starts_above_1024_squared_pixels():
    """docs/report.md: latents are decoded tile by tile above 1024² pixels. With sides that are
    multiples of 8, 1024 x 1024 = 1,048,576 pixels decodes whole and the next pixel count up,
    40 x 26216 = 1,048,640 (= 1024² + 64), in tiles."""
    from trainers.lokr.sampling import TILE_ABOVE

    assert not 1024 * 1024 > TILE_ABOVE
    assert 40 * 26216 == 1024 ** 2 + 64 and 40 * 26216 > TILE_ABOVE


def test_at_end_decides_the_render_after_the_last_step():
    def due(overrides, total):
        cfg = load_config("tiny", overrides)
        return [step for step in range(1, total + 1) if is_due(cfg, step, total)]

    assert due(["sample.every=3"], 7) == [3, 6, 7]
    assert due(["sample.every=3", "sample.at_end=false"], 7) == [3, 6]
    assert due(["sample.every=3"], 6) == [3, 6]
    assert due(["sample.every=0"], 7) == due(["sample.every=0", "sample.at_end=true"], 7) == []
    with pytest.raises(HakubooruError, match="'sample.at_end' must be bool"):
        load_config("tiny", ["sample.at_end=1"])
    with pytest.raises(HakubooruError, match="did you mean 'sample.at_end'"):
        load_config("tiny", ["sample.at_ends=false"])


@pytest.fixture(scope="module")
def sdxl():
    return models.tiny_sdxl(seed=0)


def test_a_render_announces_itself(sdxl, tmp_path, capsys):
    # three prompts: the section's 64x64 and 1 step, one at 96 wide, one with 2 steps
    prompts = '[{prompt = "a"}, {prompt = "b", width = 96}, {prompt = "c", steps = 2}]'
    cfg = load_config("tiny", ["sample.steps=1", f"sample.prompts={prompts}"])
    paths = render(sdxl, cfg, tmp_path / "samples", 5, "cpu")
    assert [p.name for p in paths] == ["00000005-0.png", "00000005-1.png", "00000005-2.png", "00000005-sheet.png"]
    lines = capsys.readouterr().err.splitlines()
    assert (f"rendering 3 sample prompts (64x64, 96x64; 1, 2 steps, EulerAncestralDiscreteScheduler) "
            f"with the LoKr at step 5 on tiny -> {tmp_path / 'samples'}/") in lines
    assert not any("sample 1/3" in x for x in lines)  # no progress bar: stderr is not a terminal here
