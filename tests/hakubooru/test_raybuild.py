"""Builds on Ray (``build --ray``) give a local build's bytes: on a real cluster started with
``ray start --head`` (a killed worker's task retried, a killed driver resumed, a task's error one
line) and on a Ray started in-process; without Ray installed, --ray is one line."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hakubooru import manifest as mf
from hakubooru.builder import build_shards
from hakubooru.errors import HakubooruError
from hakubooru.raybuild import EXTRA, HOLD_ENV
from tests.helpers import REPO
from tests.helpers.archives import folder_bytes
from tests.helpers.builds import build_every_post
from tests.helpers.raycluster import alive, marked_pids, new_mark, ray_env, start_head, stop_marked

SHARD_SIZE = 100  # 600 demo posts: 6 shards


@pytest.fixture(scope="module")
def demo(synth_demo, tmp_path_factory):
    db_path, images = synth_demo
    tmp = tmp_path_factory.mktemp("raybuild")
    out = build_every_post(synth_demo, tmp, tmp / "local", shard_size=SHARD_SIZE, workers=2)
    return {"db": db_path, "images": images, "tmp": tmp, "sel": tmp / "all.parquet", "out": out}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU Ray head on 127.0.0.1 whose tasks wait in a hold folder (HOLD_ENV) until released."""
    mark = new_mark()
    hold = tmp_path_factory.mktemp("hold")
    env = ray_env(mark, **{HOLD_ENV: str(hold)})
    try:
        address, client = start_head(env)
        yield {"address": address, "client": client, "hold": hold, "env": env}
    finally:
        stop_marked(mark)


def build_cli(demo, cluster, out: Path, address: str | None = None, *more) -> subprocess.Popen:
    """``python -m hakubooru build --ray ADDRESS --quiet`` into ``out`` (ADDRESS: the cluster's
    unless given; ``more``: other options), stderr captured."""
    args = ["--db", str(demo["db"]), "--images", str(demo["images"]), "--selection", str(demo["sel"]),
            "--out", str(out), "--shard-size", str(SHARD_SIZE), "--cache-dir", str(demo["tmp"] / "cache"),
            "--ray", address or cluster["address"], "--quiet", *more]
    return subprocess.Popen([sys.executable, "-m", "hakubooru", "build", *args], cwd=REPO,
                            env=cluster["env"], stderr=subprocess.PIPE, text=True)


def held(hold: Path, proc: subprocess.Popen, count: int = 1, timeout: float = 120.0) -> list:
    """Wait until ``count`` task attempts of the build ``proc`` wait in ``hold``; their (shard,
    pid), oldest first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        attempts = [p for p in hold.iterdir() if not p.name.startswith("release")]
        if len(attempts) >= count:
            attempts.sort(key=lambda p: p.stat().st_mtime_ns)
            return [tuple(int(v) for v in p.name.split(".")) for p in attempts]
        time.sleep(0.05)
    raise AssertionError(f"no {count} Ray task attempts within {timeout} s")


def clear(hold: Path) -> None:
    for p in hold.iterdir():
        p.unlink()


@pytest.mark.slow
def test_cluster_build_is_byte_identical_and_survives_a_killed_worker(demo, cluster, tmp_path):
    clear(cluster["hold"])
    out = tmp_path / "ray"
    proc = build_cli(demo, cluster, out)
    (shard, pid), *_ = held(cluster["hold"], proc)
    os.kill(pid, signal.SIGKILL)  # the Ray worker process building `shard`, mid-task
    (cluster["hold"] / "release").touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # Ray's logs stay out of the terminal: with --quiet only the end-of-run line is printed;
    # 6 shards, the killed one run twice
    (line,) = err.splitlines()
    assert line.startswith(f"{out}: 6 shards built, 0 verified (of 6); 600 posts")
    assert line.endswith("1 Ray task retries; in " + line.rsplit("; in ", 1)[1])
    assert len([p for p in cluster["hold"].glob(f"{shard}.*")]) == 2
    assert folder_bytes(out) == folder_bytes(demo["out"])


@pytest.mark.slow
def test_cluster_worker_killed_with_no_retries_left_is_one_line(demo, cluster, tmp_path):
    clear(cluster["hold"])
    proc = build_cli(demo, cluster, tmp_path / "ray", None, "--ray-retries", "0")
    (shard, pid), *_ = held(cluster["hold"], proc)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    (cluster["hold"] / "release").touch()
    assert proc.returncode == 2
    (line,) = err.splitlines()
    assert line.startswith(f"error: the Ray worker building {mf.shard_name(shard)} died in each of its "
                           "1 runs (--ray-retries 0): ")
    assert "; Ray's logs: " in line


@pytest.mark.slow
def test_cluster_driver_killed_and_rerun_keeps_finished_shards(demo, cluster, tmp_path):
    clear(cluster["hold"])
    out = tmp_path / "ray"
    (cluster["hold"] / "release-0").touch()  # shard 0 goes through, the others wait
    proc = build_cli(demo, cluster, out)
    deadline = time.monotonic() + 120
    while not (out / "shard-000000.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    held(cluster["hold"], proc, 2)  # shard 0 done, another one waiting
    proc.kill()
    proc.communicate()
    assert not (out / "manifest.json").exists()
    (cluster["hold"] / "release").touch()
    rerun = build_cli(demo, cluster, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    built, verified = (int(n) for n in re.search(r"(\d+) shards built, (\d+) verified", err).groups())
    assert verified >= 1 and built + verified == 6
    assert folder_bytes(out) == folder_bytes(demo["out"])


@pytest.mark.slow
def test_cluster_task_error_is_the_one_line_of_a_local_build(demo, cluster, tmp_path):
    """A node that does not see the output folder (here: its plan file gone while the tasks wait)
    stops the build with one line; through Ray Client (ray://) too."""
    clear(cluster["hold"])
    out = tmp_path / "ray"
    proc = build_cli(demo, cluster, out, cluster["client"])
    held(cluster["hold"], proc)
    (out / mf.PLAN_FILE).rename(out / "plan.json")
    (cluster["hold"] / "release").touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.splitlines() == [
        f"error: Ray node {os.uname().nodename} does not see the output folder {out} (no plan file "
        f"{mf.PLAN_FILE} there, or another one); every node must mount it at the same path (a "
        "shared file system)"]


@pytest.mark.slow
def test_local_ray_in_process_gives_the_same_bytes_and_leaves_no_process(demo, tmp_path, monkeypatch,
                                                                         capfd):
    mark = new_mark()
    for name, value in ray_env(mark).items():
        if name not in os.environ or os.environ[name] != value:
            monkeypatch.setenv(name, value)
    try:
        capfd.readouterr()
        before = signal.getsignal(signal.SIGTERM)
        result = build_shards(demo["db"], demo["images"], demo["sel"], tmp_path / "ray",
                              shard_size=SHARD_SIZE, cache_dir=demo["tmp"] / "cache", progress=False,
                              ray="local", ray_tasks=2)
        # Ray's own SIGTERM handler (sys.exit) does not outlive the build: processes forked
        # afterwards (tag counting, DataLoader workers) would inherit it
        assert signal.getsignal(signal.SIGTERM) is before
        assert (result.shards_built, result.ray_retries, result.complete) == (6, 0, True)
        assert capfd.readouterr().err.splitlines() == [result.summary()]  # no line of Ray's
        assert folder_bytes(tmp_path / "ray") == folder_bytes(demo["out"])
        assert not alive(marked_pids(mark))  # the Ray started for the build is gone
    finally:
        stop_marked(mark)


def test_without_ray_the_option_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from hakubooru.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = ["build", "--db", "d.db", "--images", "img", "--selection", "s.parquet",
            "--out", str(tmp_path / "out"), "--ray"]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stderr) == (
        2, f"error: --ray needs Ray, an optional dependency: {EXTRA}\n")
    assert EXTRA == "pip install 'hakubooru[ray]'"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_stops_a_local_ray_build_and_its_ray(demo, tmp_path):
    mark, hold = new_mark(), tmp_path / "hold"
    hold.mkdir()
    cluster = {"address": "local", "env": ray_env(mark, **{HOLD_ENV: str(hold)})}
    try:
        proc = build_cli(demo, cluster, tmp_path / "ray")
        held(hold, proc)  # the tasks wait: the build is in the middle of its shards
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (130, "interrupted\n"), err
        assert not alive(marked_pids(mark))  # the Ray it started, workers included, is gone
        assert not list((tmp_path / "ray").glob("shard-*.tar"))
    finally:
        stop_marked(mark)


def test_ray_options_out_of_range_are_one_line(demo, tmp_path):
    for kw in ({"ray_retries": -1}, {"ray_tasks": 0}):
        with pytest.raises(HakubooruError, match="^Ray task retries must be at least 0 and tasks at least 1$"):
            build_shards(demo["db"], demo["images"], demo["sel"], tmp_path / "out", ray="local", **kw)
    assert not (tmp_path / "out").exists()
