"""Builds leave no debris and never collide: temporary files of killed runs are removed by the
rerun, a second build of the same shards stops with one line, a full disk names the file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hakubooru.buildlock import LOCK_FILE
from hakubooru.builder import build_shards, merge
from hakubooru.errors import HakubooruError
from tests.helpers import REPO
from tests.helpers.archives import folder_bytes
from tests.helpers.builds import build_every_post


@pytest.fixture(scope="module")
def demo(synth_demo, tmp_path_factory):
    db_path, images = synth_demo
    tmp = tmp_path_factory.mktemp("robust")
    out = build_every_post(synth_demo, tmp, tmp / "reference", shard_size=200)
    return {"db": db_path, "images": images, "tmp": tmp, "sel": tmp / "all.parquet", "out": out}


def build(demo, out, **kw):
    return build_shards(demo["db"], demo["images"], demo["sel"], out, shard_size=200,
                        cache_dir=demo["tmp"] / "cache", progress=False, **kw)


def test_clean_build_file_list(demo):
    # 600 posts / 200 = 3 shards; bookkeeping: plan, lock, .parts/ with one sidecar per shard;
    # the dataset card README.md
    names = sorted(str(p.relative_to(demo["out"])) for p in demo["out"].rglob("*"))
    assert names == [".hakubooru-build.json", ".hakubooru-build.lock", ".parts",
                     ".parts/shard-000000.json", ".parts/shard-000001.json", ".parts/shard-000002.json",
                     "README.md", "index.parquet", "manifest.json", "shard-000000.tar", "shard-000001.tar",
                     "shard-000002.tar", "skipped.parquet", "tag_counts.parquet"]


def test_rerun_removes_every_temporary_file_a_kill_leaves(demo, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(demo["out"], out)
    (out / "shard-000001.tar").unlink()  # the shard being written when the build was killed
    (out / "manifest.json").unlink()
    debris = [".shard-000001.tar.tmp", ".manifest.json.0123abcd.tmp", ".index.parquet.4567ef.tmp",
              ".skipped.parquet.89ab.tmp", ".tag_counts.parquet.5a5a.tmp", "..hakubooru-build.json.cdef.tmp",
              ".parts/.shard-000001.json.0a1b2c.tmp", ".parts/.shard-000002.json.3d4e.tmp"]
    for name in debris:
        (out / name).write_bytes(b"half written")
    result = build(demo, out)
    assert (result.shards_built, result.shards_verified) == (1, 2)
    assert folder_bytes(out) == folder_bytes(demo["out"])
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in demo["out"].rglob("*"))


def test_merge_removes_assembly_temporaries(demo, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(demo["out"], out)
    (out / "manifest.json").unlink()
    (out / ".index.parquet.77.tmp").write_bytes(b"x")
    merge(out)
    assert folder_bytes(out) == folder_bytes(demo["out"])


HOLD = textwrap.dedent("""
    import sys, time
    from hakubooru.buildlock import BuildLock
    lock = BuildLock(sys.argv[1])
    lock.take_shards([int(k) for k in sys.argv[2:]], str)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
""")


def hold(out: Path, *shards: int) -> subprocess.Popen:
    """Another process holding the build lock of ``shards`` of ``out``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), *map(str, shards)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_second_build_of_the_same_shards_is_one_line(demo, tmp_path):
    out = tmp_path / "busy"
    shutil.copytree(demo["out"], out)
    (out / "shard-000002.tar").unlink()
    before = folder_bytes(out)
    proc = hold(out, 2)
    try:
        with pytest.raises(HakubooruError, match=rf"^another build is writing {out} \(it holds "
                                                 rf"shard-000002.tar; lock .*{LOCK_FILE}\); wait"):
            build(demo, out)
        assert folder_bytes(out) == before  # nothing written, nothing removed
        # the command line: exit 2, one line
        cmd = [sys.executable, "-m", "hakubooru", "build", "--db", str(demo["db"]), "--images",
               str(demo["images"]), "--selection", str(demo["sel"]), "--out", str(out),
               "--shard-size", "200", "--cache-dir", str(demo["tmp"] / "cache"), "--quiet"]
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 2
        assert run.stderr.startswith("error: another build is writing") and run.stderr.count("\n") == 1
        # a part with other shards runs beside it: 0/3 holds shard 0 only
        assert build(demo, out, part="0/3").shards_verified == 1
    finally:
        proc.stdin.close()
        proc.wait()
    assert build(demo, out).complete
    assert folder_bytes(out) == folder_bytes(demo["out"])


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_full_disk_names_the_file_and_the_space(demo, small_disk):
    out = small_disk / "out"
    with pytest.raises(HakubooruError) as e:
        build(demo, out)
    message = str(e.value)
    assert message.startswith(f"no space left on the device writing {out}/")
    assert " MiB free, at least " in message and "\n" not in message
    assert not [p for p in out.rglob("*.tmp")]  # the shard being written was dropped


def test_full_disk_while_saving_a_training_state(small_disk):
    import torch

    from trainers.lokr.state import list_states, save_state
    save_state(small_disk / "states", 1, {"w": torch.zeros(1000)}, keep=3)
    with pytest.raises(HakubooruError, match=r"no space left on the device writing .*state-00000002.state: "):
        save_state(small_disk / "states", 2, {"w": torch.zeros(100_000)}, keep=3)  # 400 KB
    assert [p.name for p in list_states(small_disk / "states")] == ["state-00000001.state"]
    assert sorted(p.name for p in (small_disk / "states").iterdir()) == ["state-00000001.state"]


class _FillingFile:
    """A real file that fails like a full disk once ``room`` bytes were written (where no tmpfs
    can be mounted, the full disk is injected at the write call)."""

    def __init__(self, f, room: list):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room[0]:
            raise OSError(28, "No space left on device")  # ENOSPC
        self._room[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_full_disk_injected_at_the_shard_write(demo, tmp_path, monkeypatch):
    import builtins

    import hakubooru.shardwriter as sw
    room = [150_000]  # the first shard (about 200 KB) does not fit
    monkeypatch.setattr(sw, "open", lambda *a, **k: _FillingFile(builtins.open(*a, **k), room), raising=False)
    out = tmp_path / "out"
    with pytest.raises(HakubooruError) as e:
        build(demo, out)
    assert str(e.value).startswith(f"no space left on the device writing {out}/.shard-000000.tar.tmp: ")
    assert "MiB free, at least" in str(e.value)
    assert not list(out.glob(".shard-*.tmp")) and not list(out.glob("shard-*.tar"))
    monkeypatch.undo()
    assert build(demo, out).complete  # with space again, the rerun builds the folder
    assert folder_bytes(out) == folder_bytes(demo["out"])


def test_full_disk_message_gives_mib_free_and_needed(tmp_path):
    """reporting_full_disk turns ENOSPC / EDQUOT into one line with the free space of the file's
    disk and the size of the write in MiB (2**20 bytes); other OSErrors pass through."""
    import errno
    import re

    from hakubooru.errors import reporting_full_disk

    target = tmp_path / "shard-000000.tar"
    for code in (errno.ENOSPC, errno.EDQUOT):
        with pytest.raises(HakubooruError) as e:
            with reporting_full_disk(target, needed=7 * 2**19):  # 3.5 MiB
                raise OSError(code, os.strerror(code))
        free_mib = shutil.disk_usage(tmp_path).free / 2**20
        message = str(e.value)
        match = re.fullmatch(rf"no space left on the device writing {re.escape(str(target))}: "
                             r"([0-9.]+) MiB free, at least 3\.5 MiB more needed; free some space "
                             r"or write to another disk", message)
        assert match, message
        assert abs(float(match.group(1)) - free_mib) < 512  # the disk may change a little meanwhile
    with pytest.raises(PermissionError):
        with reporting_full_disk(target, needed=1):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_lock_file_mode_and_remove_temporaries_count_by_hand(tmp_path):
    """The lock file gets the normal 0644 under umask 022, like every output; remove_temporaries
    deletes `.<name>.tmp` and `.<name>.<hex>.tmp` of the names given, nothing else, and says how
    many."""
    from hakubooru.buildlock import LOCK_FILE, BuildLock, remove_temporaries

    old = os.umask(0o022)
    try:
        with BuildLock(tmp_path):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o644
    for name in (".index.parquet.tmp", ".manifest.json.3fa9.tmp", ".other.json.tmp", "index.parquet"):
        (tmp_path / name).write_text("x")
    assert remove_temporaries(tmp_path, ["index.parquet", "manifest.json"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_FILE, ".other.json.tmp", "index.parquet"])
    assert remove_temporaries(tmp_path / "absent", ["index.parquet"]) == 0
