"""Workers do not run their parent's signal handlers (hakubooru/procs.py): SIGTERM ends a
worker, SIGINT is left to the parent, the parent's SIGINT and SIGTERM wait while it forks, and
on Linux the kernel ends a worker when its parent dies (its parent-death signal is SIGKILL).
A worker that ran a raising parent handler while it started would unwind out of multiprocessing
into the parent's own code and run on in the copy (it did: a pytest copy hung CI)."""
from __future__ import annotations

import ctypes
import signal
import sys
import threading

import pytest

from hakubooru.builder import _pool
from hakubooru.procs import forking, ordered_map, worker_pool

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")

HELD = {signal.SIGINT, signal.SIGTERM}
PR_GET_PDEATHSIG = 2  # <linux/prctl.h>
LINUX = sys.platform.startswith("linux")
WORKER = (signal.SIG_DFL, signal.SIG_IGN, set(), signal.SIGKILL if LINUX else None)


def _signals(_):
    """In a worker: its SIGTERM and SIGINT handlers, which of the two it holds back, and its
    parent-death signal (Linux)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    death = None
    if LINUX:
        found = ctypes.c_int()
        ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(found), 0, 0, 0)
        death = found.value
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), HELD & set(held), death


def _raise(signum, frame):
    raise KeyboardInterrupt


@pytest.fixture
def raising_handlers():
    """This process's SIGTERM and SIGINT raise, as Ctrl-C's (or Ray's sys.exit) do."""
    before = {s: signal.signal(s, _raise) for s in HELD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    assert signal.getsignal(signal.SIGTERM) is _raise and signal.getsignal(signal.SIGINT) is _raise
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # forking() gave the mask back
    for s, handler in before.items():
        signal.signal(s, handler)


def test_ordered_map_workers_reset_the_parents_handlers(raising_handlers):
    got = list(ordered_map(_signals, list(range(6)), workers=2))
    assert got == [WORKER] * 6


def test_build_pool_workers_reset_the_parents_handlers(raising_handlers):
    with _pool(2) as pool:
        got = list(pool.map(_signals, range(6)))
    assert got == [WORKER] * 6


def test_spawned_pool_workers_reset_their_handlers_and_die_with_the_parent(raising_handlers):
    with worker_pool(2, method="spawn") as pool:  # the dataset report's
        got = pool.map(_signals, range(6))
    assert got == [WORKER] * 6


def test_forking_holds_a_signal_to_this_thread_until_it_ends():
    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with forking():
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            sum(range(100_000))  # handlers run between bytecodes: here, had it not been held
            held = list(got)
        sum(range(100_000))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert held == [] and got == [signal.SIGTERM]


class _Signals:
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return _signals(i)


def test_data_loader_workers_reset_the_parents_handlers(raising_handlers):
    from trainers.lokr.data.batches import make_loader
    got = [tuple(g) for g in make_loader(_Signals(), workers=2)]  # collated: lists
    assert got == [WORKER] * 6
