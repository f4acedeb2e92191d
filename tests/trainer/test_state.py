"""Training-state files: atomic writes, no debris from killed writes, honest messages."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.state import list_states, load_latest_state, read_state, save_state
from trainers.lokr.train import train


def test_failed_write_leaves_the_previous_state_and_no_file(tmp_path, monkeypatch):
    folder = tmp_path / "states"
    save_state(folder, 1, {"w": torch.ones(3)}, keep=3)

    def broken_fsync(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        save_state(folder, 2, {"w": torch.full((3,), 2.0)}, keep=3)
    monkeypatch.undo()
    # the write never reached the final name, and left no temporary behind
    assert sorted(p.name for p in folder.iterdir()) == ["state-00000001.state"]
    path, state = load_latest_state(folder)
    assert path.name == "state-00000001.state" and torch.equal(state["w"], torch.ones(3))


def test_save_removes_temporaries_of_killed_writes(tmp_path):
    folder = tmp_path / "states"
    folder.mkdir()
    (folder / ".state-00000007.state.tmp").write_bytes(b"HAKUSTATE2\nhalf")
    (folder / "notes.txt").write_text("mine")
    save_state(folder, 8, {"w": torch.ones(1)}, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "state-00000008.state"]


def test_no_fallback_message_without_a_previous_state(tmp_path, capsys):
    folder = tmp_path / "states"
    save_state(folder, 1, {"w": torch.ones(1)}, keep=3)
    save_state(folder, 2, {"w": torch.ones(1)}, keep=3)
    for p in list_states(folder):
        p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(HakubooruError, match=r"every training state in .* is damaged \(2, newest state-00000002"):
        load_latest_state(folder)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].endswith("state-00000002.state is damaged or was cut short (checksum mismatch); "
                           "falling back to the previous state")
    assert err[1].endswith("state-00000001.state is damaged or was cut short (checksum mismatch)")


def test_resuming_a_finished_run_prints_no_nan(tmp_path, capsys):
    shards = make_test_shards(tmp_path / "shards", n=16).dir
    cfg = load_config("tiny", ["train.max_steps=1", "train.save_every=1"])
    train(cfg, shards, tmp_path / "run")
    capsys.readouterr()
    summary = train(cfg, shards, tmp_path / "run", resume=tmp_path / "run")
    err = capsys.readouterr().err
    assert summary["steps_this_run"] == 0 and summary["step"] == 1
    assert "nan" not in err
    assert "trained 0 steps (0 images) to step 1/1, 0 skipped (non-finite loss) (the run had already reached it)" in err


def test_payloads_read_back_whatever_the_header_length(tmp_path):
    """A state's body is a safetensors file, whose JSON header is padded with spaces to a
    multiple of 8 bytes. A string of k = 0..7 characters in the payload makes the header k bytes
    longer, so one of these 8 states has a header with no padding at all: every one reads back
    as written (nested dicts, lists, numbers, strings, None, a tensor used twice)."""
    for k in range(8):
        w = torch.arange(3, dtype=torch.float32) * k
        payload = {"note": "x" * k, "step": k, "lr": 0.5, "flags": [True, None], "w": w, "nested": {"same_w": w}}
        path = save_state(tmp_path / "states", k, payload, keep=8)
        state = read_state(path)
        assert {key: v for key, v in state.items() if key not in ("w", "nested")} == {
            "note": "x" * k, "step": k, "lr": 0.5, "flags": [True, None]}
        assert torch.equal(state["w"], w) and torch.equal(state["nested"]["same_w"], w)


def test_a_header_without_its_newline_is_a_bad_header(tmp_path):
    """HAKUSTATE2\\n, 64 hex digits, then "\\n": a file of full length whose 76th byte is not
    the newline is "not a complete training state (bad header)", not a checksum mismatch."""
    path = tmp_path / "state-00000001.state"
    path.write_bytes(b"HAKUSTATE2\n" + b"0" * 64 + b"X" + b"body")
    with pytest.raises(HakubooruError, match=r"not a complete training state \(bad header\)"):
        read_state(path)
