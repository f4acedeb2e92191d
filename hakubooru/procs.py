"""die_with_parent(): a worker process ends when its parent dies, even by SIGKILL.

Worker pools keep their task queues' write ends open in every worker, so a worker whose parent
was killed waits for a task forever. Call ``die_with_parent(os.getpid())`` (the parent's pid,
taken in the parent) first thing in each worker: on Linux the kernel then sends the worker
SIGKILL when the thread that forked it ends (pools here fork from the thread that calls them);
elsewhere a daemon thread polls the parent pid every second.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) as soon as process ``parent_pid``, its parent, is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            _check(parent_pid)  # the parent may have died before prctl: then no signal comes
            return
    threading.Thread(target=_watch, args=(parent_pid,), name="die-with-parent", daemon=True).start()


def ordered_map(func, items: list, workers: int, chunksize: int = 1):
    """``map(func, items)``, in order, in ``workers`` forked processes (spawned off Linux) that end
    with this one; in this process for one worker or one item. Stopping the iteration ends them."""
    if workers <= 1 or len(items) <= 1:
        yield from map(func, items)
        return
    pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
        min(workers, len(items)), die_with_parent, (os.getpid(),))
    try:
        yield from pool.imap(func, items, chunksize=chunksize)
    finally:
        pool.terminate()


def _check(parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch(parent_pid: int) -> None:
    while True:
        _check(parent_pid)
        time.sleep(1.0)
