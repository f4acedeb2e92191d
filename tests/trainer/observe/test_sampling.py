"""Sample images during training ([sample]): the files appear as configured, and sampling leaves
the training bitwise untouched, with and without a resume in between; a render says what it
renders and stops within a block when the run is asked to stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hakubooru.errors import HakubooruError
from tests.helpers import REPO
from tests.helpers.shards import make_test_shards
from tests.helpers.trainer_cli import run_cli, tensors
from trainers.lokr.sdxl import model as models
from trainers.lokr.config import load_config
from trainers.lokr.distributed import Dist
from trainers.lokr.observe.sampling import contact_sheet, is_due, maybe_render, render
from trainers.lokr.state import list_states, load_latest_state, state_dir
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from trainers.lokr.observe.sampling import TILE_ABOVE

    assert not 1024 * 1024 > TILE_ABOVE
    assert 40 * 26216 == 1024 ** 2 + 64 and 40 * 26216 > TILE_ABOVE


def test_at_end_decides_the_render_after_the_last_step(tmp_path):
    def due(overrides, total):
        cfg = load_config("tiny", overrides)
        return [step for step in range(1, total + 1) if is_due(cfg, step, total)]

    assert due(["sample.every=3"], 7) == [3, 6, 7]
    assert due(["sample.every=3", "sample.at_end=false"], 7) == [3, 6]
    assert due(["sample.every=3"], 6) == [3, 6]
    assert due(["sample.every=0"], 7) == due(["sample.every=0", "sample.at_end=true"], 7) == []
    # not due: nothing rendered, no collective, no stop
    run = SimpleNamespace(cfg=load_config("tiny", ["sample.every=3", "sample.at_end=false"]), total_steps=7,
                          dist=Dist(0, 1, 0, torch.device("cpu")), output=tmp_path, sdxl=None)
    assert maybe_render(run, 7) == ({}, False) and not (tmp_path / "samples").exists()
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


def test_a_stop_ends_a_render_within_a_block(sdxl, tmp_path):
    cfg = load_config("tiny", ["sample.every=1", "sample.steps=50"])  # 2 prompts x 50 steps if not stopped
    stop = {"set": False}
    calls = {"unet": 0}

    def count_and_stop(_module, _args, _out):  # the signal arrives during the first UNet call
        calls["unet"] += 1
        stop["set"] = True

    hook = sdxl.unet.register_forward_hook(count_and_stop)
    modes = [m.training for m in sdxl.unet.modules()]
    rng = torch.get_rng_state()
    try:
        assert render(sdxl, cfg, tmp_path / "direct", 1, "cpu", lambda: stop["set"]) is None
        assert calls["unet"] == 1 and not list((tmp_path / "direct").glob("*.png"))
        # through maybe_render: nothing to log, and the stop is reported
        stop["set"], calls["unet"] = False, 0
        run = SimpleNamespace(cfg=cfg, total_steps=1, dist=Dist(0, 1, 0, torch.device("cpu")), output=tmp_path,
                              sdxl=sdxl)
        assert maybe_render(run, 1, lambda: stop["set"]) == ({}, True)
        assert calls["unet"] == 1 and not list((tmp_path / "samples").glob("*.png"))
        # a stop during the VAE decode (in its middle block): the image is not written either
        stop["set"] = False
        hook.remove()
        hook = sdxl.vae.decoder.mid_block.register_forward_pre_hook(lambda *_: stop.update(set=True))
        cfg = load_config("tiny", ["sample.steps=2", 'sample.prompts=[{prompt = "a"}]'])
        assert render(sdxl, cfg, tmp_path / "decode", 1, "cpu", lambda: stop["set"]) is None
        assert not list((tmp_path / "decode").glob("*.png"))
    finally:
        hook.remove()
    # the render's own hooks are gone, modes and the random state are as they were
    assert all(not m._forward_pre_hooks for m in [*sdxl.unet.modules(), *sdxl.vae.modules()])
    assert [m.training for m in sdxl.unet.modules()] == modes and torch.equal(torch.get_rng_state(), rng)


def sigterm_during_render(args, state):
    """Start a tiny run whose renders take minutes (2000 steps), SIGTERM it a second into its
    first render; (process, its stderr, the stat of `state` before the signal)."""
    proc = subprocess.Popen([sys.executable, "-m", "trainers.lokr", *args, "--set", "sample.steps=2000"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err, rendering = [], threading.Event()

    def read():
        for chunk in iter(lambda: proc.stderr.read(1), ""):
            err.append(chunk)
            if chunk == "\n" and "rendering 2 sample prompts" in "".join(err[-300:]):
                rendering.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert rendering.wait(300), "".join(err)[-2000:]
        before = state.stat()
        time.sleep(1)  # into the denoising
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # did not hang on: 2 x 2000 steps take minutes
    finally:
        proc.kill()
        reader.join(10)
    return proc, "".join(err), before


@pytest.mark.slow
def test_sigterm_during_the_last_steps_render_still_writes_the_final_lokr(shards, tmp_path):
    """The run has reached its last step when its render is stopped: the final LoKr is written
    (a user skipping a slow final render keeps the result), and no resume is asked for."""
    out = tmp_path / "run"
    proc, err, _ = sigterm_during_render(["--config", "tiny", "--shards", str(shards), "--max-steps", "2",
                                          "--set", "sample.every=2", "--output", str(out)],
                                         out / "states" / "state-00000002.state")
    assert proc.returncode == 0, err[-2000:]
    assert f"final LoKr {out / 'lokr.safetensors'} (its sample render stopped by SIGTERM)" in err
    assert (out / "lokr.safetensors").exists() and "resume with" not in err
    assert not (out / "samples" / "00000002-sheet.png").exists()


@pytest.mark.slow
def test_sigterm_during_a_render_stops_the_run_at_that_step(shards, tmp_path):
    """Render at step 2 with 2000 denoising steps per prompt (over a minute on the tiny model);
    SIGTERM once it has started. The state of step 2 is on disk before the render (save_every=2),
    the run stops at step 2 without writing it again, and a resume finishes the run."""
    out = tmp_path / "run"
    args = ["--config", "tiny", "--shards", str(shards), "--max-steps", "4", "--set", "train.save_every=2",
            "--set", "sample.every=2"]
    state = out / "states" / "state-00000002.state"
    proc, err, before = sigterm_during_render([*args, "--output", str(out)], state)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by SIGTERM at step 2; resume with --resume {out}" in err
    assert [p.name for p in list_states(out / "states")] == ["state-00000002.state"]
    after = state.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # written once
    assert not (out / "samples" / "00000002-sheet.png").exists() and not (out / "lokr.safetensors").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and "samples" not in lines[1]

    done = run_cli([*args, "--resume", str(out), "--set", "sample.steps=2"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out / 'states' / 'state-00000002.state'}: step 2," in done.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[3]["sample_sheet"] == "samples/00000004-sheet.png" and (out / "lokr.safetensors").exists()
