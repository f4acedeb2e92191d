"""Worker processes that end with their parent and do not run its signal handlers.

Worker pools keep their task queues' write ends open in every worker, so a worker whose parent
was killed waits for a task forever. Call ``worker_start(os.getpid())`` (the parent's pid,
taken in the parent) first thing in each worker: on Linux the kernel then sends the worker
SIGKILL when the thread that forked it ends (pools here fork from the thread that calls them);
elsewhere a daemon thread polls the parent pid every second.

A forked worker also inherits its parent's Python signal handlers. A handler that raises
(Ctrl-C's, Ray's ``sys.exit``) would unwind a worker that gets SIGTERM while it starts out of
multiprocessing and into the parent's own code, running on in the copy. So fork inside
``forking()``, which holds SIGINT and SIGTERM back until ``worker_start`` has reset them.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def forking():
    """Fork workers inside this block: SIGINT and SIGTERM wait until it ends (in this process,
    where they then act as usual) or until ``worker_start`` (in a worker forked meanwhile)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM stops this process as Ctrl-C does (KeyboardInterrupt) inside the block, so the
    ``with`` and ``finally`` blocks around the work run; the handler before it comes back."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_start(parent_pid: int) -> None:
    """First thing in a worker: SIGTERM ends it, SIGINT is left to the parent (which ends its
    workers), and it dies with process ``parent_pid``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) as soon as process ``parent_pid``, its parent, is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            _check(parent_pid)  # the parent may have died before prctl: then no signal comes
            return
    threading.Thread(target=_watch, args=(parent_pid,), name="die-with-parent", daemon=True).start()


def _start(parent_pid: int, initializer, initargs) -> None:
    worker_start(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(workers: int, initializer=None, initargs=(), method: str = "fork"):
    """A ``multiprocessing`` pool of ``workers`` processes, forked (spawned off Linux, or with
    ``method="spawn"``: fresh interpreters), that end with this one and leave SIGINT to it;
    each runs ``initializer(*initargs)`` first."""
    if not sys.platform.startswith("linux"):
        method = "spawn"
    with forking():
        return multiprocessing.get_context(method).Pool(workers, _start, (os.getpid(), initializer, initargs))


def ordered_map(func, items: list, workers: int, chunksize: int = 1):
    """``map(func, items)``, in order, in ``workers`` forked processes (spawned off Linux) that end
    with this one; in this process for one worker or one item. Stopping the iteration ends them."""
    if workers <= 1 or len(items) <= 1:
        yield from map(func, items)
        return
    pool = worker_pool(min(workers, len(items)))
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
