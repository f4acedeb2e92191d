"""Exact resume: a run killed right after a state write and resumed ends bit for bit where an
uninterrupted run ends; damaged states are skipped; states of another config or dataset refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hakubooru.errors import HakubooruError
from tests.helpers import REPO
from tests.helpers.shards import make_test_shards
from tests.helpers.trainer_cli import run_cli, tensors
from trainers.lokr.config import load_config
from trainers.lokr.state import list_states, load_latest_state, read_state, save_state
from trainers.lokr.train import KILL_AFTER_STATE_ENV, train

# 20 samples in 3 sizes (7, 7, 6), global batch 2: 3 + 3 + 3 batches, 4 optimizer steps of 2 per
# epoch (one batch sits out), so 6 steps cross an epoch boundary; the kill at step 3 falls in the
# learning-rate warmup.
TINY = ["train.save_every=3", "train.max_steps=6", "optimizer.warmup_steps=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("resume_shards"), n=20).dir


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_identical(shards, tmp_path):
    killed = tmp_path / "killed"
    proc = run_cli(["--config", "tiny", "--shards", str(shards), "--output", str(killed),
                    *[a for s in TINY for a in ("--set", s)]], {KILL_AFTER_STATE_ENV: "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_states(killed / "states")] == ["state-00000003.state"]
    assert not (killed / "lokr.safetensors").exists()

    # Resume with DataLoader workers (the straight run below has none): same result.
    summary = train(load_config("tiny", TINY + ["data.workers=2"]), shards, killed, resume=killed)
    assert summary["steps_this_run"] == 3 and summary["step"] == 6
    straight = tmp_path / "straight"
    train(load_config("tiny", TINY), shards, straight)

    a = read_state(straight / "states" / "state-00000006.state")
    b = read_state(killed / "states" / "state-00000006.state")
    assert a["epoch"] == b["epoch"] >= 1 and a["cursor"] == b["cursor"]
    ta, tb = tensors({k: a[k] for k in ("lokr", "optimizer", "scaler")}), \
        tensors({k: b[k] for k in ("lokr", "optimizer", "scaler")})
    assert ta.keys() == tb.keys() and any("lokr_w2" in k for k in ta) and any("state1" in k for k in ta)
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert unequal == []
    # metrics.jsonl: each step once, though the killed run had logged nothing past its state
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_damaged_states_fall_back_with_a_message(tmp_path, capsys):
    folder = tmp_path / "states"
    for step in (1, 2, 3, 4):
        save_state(folder, step, {"step": step, "w": torch.full((3,), float(step))}, keep=3)
    # keep = 3: the oldest is gone
    assert [p.name for p in list_states(folder)] == ["state-00000002.state", "state-00000003.state", "state-00000004.state"]
    # newest cut short (as by a full disk or a copy interrupted), the one before with a flipped byte
    newest, middle = list_states(folder)[2], list_states(folder)[1]
    newest.write_bytes(newest.read_bytes()[:-10])
    data = bytearray(middle.read_bytes())
    data[-5] ^= 0xFF
    middle.write_bytes(bytes(data))
    # and an interrupted write: a temporary file that never got renamed
    (folder / ".state-00000005.state.tmp").write_bytes(b"HAKUSTATE1\n")
    path, state = load_latest_state(folder)
    assert path.name == "state-00000002.state" and state["step"] == 2 and torch.equal(state["w"], torch.full((3,), 2.0))
    err = capsys.readouterr().err
    assert "state-00000004.state is damaged or was cut short" in err
    assert "state-00000003.state is damaged or was cut short" in err
    assert err.count("falling back to the previous state") == 2
    newest.write_bytes(b"junk")
    with pytest.raises(HakubooruError, match="not a complete training state"):
        read_state(newest)
    for p in list_states(folder):
        p.write_bytes(b"")
    with pytest.raises(HakubooruError, match="every training state .* is damaged"):
        load_latest_state(folder)
    with pytest.raises(HakubooruError, match="no training state in"):
        load_latest_state(tmp_path / "nowhere")


@pytest.mark.slow
def test_state_of_another_config_or_dataset_is_refused(shards, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", ["train.save_every=2", "train.max_steps=2"]), shards, run)
    with pytest.raises(HakubooruError, match=r"another config \(optimizer.lr_unet: 0.001 -> 0.002\)"):
        train(load_config("tiny", ["train.save_every=2", "train.max_steps=2", "optimizer.lr_unet=0.002"]),
              shards, run, resume=run)
    longer = load_config("tiny", ["train.save_every=2", "train.max_steps=3"])
    with pytest.raises(HakubooruError, match="pass --allow-config-change"):
        train(longer, shards, run, resume=run)
    other = make_test_shards(tmp_path / "other", n=20, seed=1).dir
    with pytest.raises(HakubooruError, match="written for another dataset"):
        train(longer, other, run, resume=run, allow_config_change=True)
    summary = train(longer, shards, run, resume=run, allow_config_change=True)
    assert summary["steps_this_run"] == 1 and summary["step"] == 3


@pytest.mark.slow
def test_sigterm_writes_a_state_and_exits_cleanly(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainers.lokr", "--config", "tiny", "--shards", str(shards), "--output", str(out),
           "--max-steps", "1000", "--set", "train.save_every=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert last < 1000 and [p.name for p in list_states(out / "states")] == [f"state-{last:08d}.state"]
    assert f"stopped by SIGTERM at step {last}; resume with --resume {out}" in err
    assert read_state(out / "states" / f"state-{last:08d}.state")["step"] == last
