"""No orphans: when a build, a latent-cache build or a training is killed with SIGKILL, every
worker process it started is gone within seconds (hakubooru/procs.py). Linux only (/proc)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hakubooru.db import open_db
from hakubooru.selector import Selector
from tests.helpers import REPO
from tests.helpers.shards import make_test_shards

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

WORKERS = 2
GONE_WITHIN = 5.0  # seconds after the parent's death


def stat(pid: int):
    """``(state, start time)`` of a process from /proc/PID/stat, or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields 3 on: state, ppid, …, starttime (22)
    return fields[0], int(fields[1]), fields[19]


def descendants(pid: int) -> list[tuple[int, str]]:
    """``(pid, start time)`` of every live descendant of ``pid`` (found by their parent pid)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := stat(int(name))) is not None and s[0] not in "ZX":
            parents[int(name)] = (s[1], s[2])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (ppid, _) in parents.items() if ppid == parent]
        found += [(p, parents[p][1]) for p in kids]
        todo += kids
    return found


def alive(proc: tuple[int, str]) -> bool:
    """Whether this very process (same pid and start time) still runs; a zombie counts as gone."""
    s = stat(proc[0])
    return s is not None and s[2] == proc[1] and s[0] not in "ZX"


def assert_workers_die_with_parent(cmd: list[str], log: Path, ready=lambda: True, stop: bool = False) -> None:
    """Start ``cmd``, wait until it has WORKERS children and ``ready()``, SIGKILL it (its children
    first stopped with SIGSTOP if ``stop``); all its descendants must be gone within GONE_WITHIN
    seconds. Survivors are killed before the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=err, stderr=err)
    children = []
    try:
        deadline = time.monotonic() + 300
        while len(children) < WORKERS or not ready():
            assert proc.poll() is None, f"ended before it was ready:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "not ready after 300 s"
            time.sleep(0.01)
            children = descendants(proc.pid)
        for pid, _ in children if stop else ():
            os.kill(pid, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        until = time.monotonic() + GONE_WITHIN
        while any(map(alive, children)) and time.monotonic() < until:
            time.sleep(0.05)
        survivors = [pid for pid, _ in filter(alive, children)]
        assert not survivors, f"alive {GONE_WITHIN} s after their parent's SIGKILL: {survivors}"
    finally:
        proc.kill()
        proc.wait()
        for child in filter(alive, children):
            os.kill(child[0], signal.SIGKILL)


@pytest.mark.parametrize("platform", ["linux", "darwin"])  # prctl, or the polling thread
def test_a_worker_whose_parent_is_already_gone_ends_at_once(platform):
    # the parent died before the worker's prctl: the worker's parent pid is no longer the expected one
    code = ("import os, sys, time; from hakubooru.procs import die_with_parent; "
            f"sys.platform = {platform!r}; die_with_parent(os.getppid() + 1); time.sleep(3); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")


def test_build_workers_die_with_the_build(synth_demo, tmp_path):
    db, images = synth_demo
    Selector.all().save(tmp_path / "all.parquet", open_db(db))
    # 600 posts re-encoded to webp in 60 shards: seconds of work; idle or busy, a pool worker
    # waits for its next task forever unless the parent-death signal ends it
    assert_workers_die_with_parent(
        [sys.executable, "-m", "hakubooru", "build", "--db", str(db), "--images", str(images),
         "--selection", str(tmp_path / "all.parquet"), "--out", str(tmp_path / "out"), "--shard-size", "10",
         "--format", "webp", "--cache-dir", str(tmp_path / "cache"), "--workers", str(WORKERS), "--quiet"],
        tmp_path / "stderr.txt")


# DataLoader workers check their parent themselves, between fetches (every 5 s when idle). Here
# they are stopped before the kill, as a worker busy in a long fetch would be: only the kernel's
# parent-death signal can end them in time. They are stopped only once each has delivered a
# batch (batch i comes from worker i mod WORKERS), so each has run its worker_init_fn.
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("orphan_shards"), n=100).dir


@pytest.mark.slow
def test_cache_workers_die_with_the_cache_build(shards, tmp_path):
    out = tmp_path / "latents"
    # 100 images, one per VAE call and per chunk: 2 chunk files = batches 0 and 1 arrived
    assert_workers_die_with_parent(
        [sys.executable, "-m", "trainers.lokr.cache", "--config", "tiny", "--shards", str(shards),
         "--out", str(out), "--batch-size", "1", "--chunk-size", "1", "--workers", str(WORKERS)],
        tmp_path / "stderr.txt", ready=lambda: len(list(out.glob("latents-*.safetensors"))) >= 2, stop=True)


@pytest.mark.slow
def test_training_workers_die_with_the_training(shards, tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    # far more steps than it takes before the kill; step 1 (grad_accum 2) used batches 0 and 1
    assert_workers_die_with_parent(
        [sys.executable, "-m", "trainers.lokr", "--config", "tiny", "--shards", str(shards),
         "--output", str(tmp_path / "run"), "--max-steps", "100000", "--set", f"data.workers={WORKERS}"],
        tmp_path / "stderr.txt", ready=lambda: metrics.exists() and metrics.stat().st_size > 0, stop=True)
