"""Real Ray clusters on the loopback address for tests, and their clean-up.

Every process of a test's cluster (``ray start`` and whatever it starts) inherits the
environment variable ``MARK_ENV`` with a value unique to the test; ``stop_marked`` ends exactly
those processes, by pid (``ray stop`` would end every Ray process of the machine).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import REPO, free_port

MARK_ENV = "HAKUBOORU_TEST_RAY_CLUSTER"
RAY = str(Path(sys.executable).parent / "ray")


def ray_env(mark: str, **extra) -> dict:
    """The environment of a test's Ray processes and drivers: this checkout importable, no usage
    stats, no token authentication (loopback only), Ray's files under a short temp folder
    (``RAY_TMPDIR``: Ray's socket paths are limited to ~107 bytes), and the clean-up mark."""
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": short_tmp(mark), MARK_ENV: mark, **extra}


def short_tmp(mark: str) -> str:
    """/tmp/<mark>: a short folder for Ray's sockets and logs."""
    path = Path("/tmp") / mark
    path.mkdir(exist_ok=True)
    return str(path)


def new_mark() -> str:
    """A unique mark (and temp folder name), e.g. ``hkr3f9a1c``."""
    return Path(tempfile.mkdtemp(prefix="hkr", dir="/tmp")).name


def start_head(env: dict, cpus: int = 2) -> tuple[str, str]:
    """``ray start --head`` on 127.0.0.1 with ``cpus`` CPUs; returns the cluster's address
    (``127.0.0.1:port``) and its Ray Client address (``ray://127.0.0.1:port``)."""
    port = client_port = free_port()
    while client_port == port:
        client_port = free_port()
    done = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                           str(port), "--ray-client-server-port", str(client_port), "--num-cpus",
                           str(cpus), "--disable-usage-stats", "--include-dashboard=false"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}"


def marked_pids(mark: str) -> list[int]:
    """The processes whose environment carries ``MARK_ENV=mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def stop_marked(mark: str, grace_s: float = 10.0) -> None:
    """End the marked processes (SIGTERM, then SIGKILL after ``grace_s``) and remove the mark's
    temp folder."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while alive(marked_pids(mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
    shutil.rmtree(Path("/tmp") / mark, ignore_errors=True)


def alive(pids) -> bool:
    """Whether any of ``pids`` is running (zombies waiting for their parent do not count)."""
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            pass
    return False
