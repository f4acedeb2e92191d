"""Shards built as Ray tasks (``build --ray [ADDRESS]``): the same shards, one task each.

The driver (``build_shards``) does what a local build does — plan, lock, verification of
finished shards, captions, assembly of manifest and index — and hands each pending shard to
``_build_shard`` in a Ray task instead of a local process, so the bytes are the same. Every
node must see the output folder and the image archives at the same paths (a shared file
system): a task first checks that it sees the driver's plan file and stops the build with one
line otherwise. A task whose worker dies is run again (``retries``); a task that fails raises
on the driver the exception the local build would (``error: ...``, one line).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from pathlib import Path

from . import manifest as mf
from .buildlock import BuildLock
from .errors import HakubooruError
from .procs import sigterm_interrupts

EXTRA = "pip install 'hakubooru[ray]'"
LOCAL = "local"  # --ray without an address: a Ray started in this process, stopped at the end
DEFAULT_RETRIES = 3  # Ray's own default for tasks
CANCEL_WAIT_S = 5.0  # how long a stopped build waits for its cancelled tasks to end
HOLD_ENV = "HAKUBOORU_TEST_RAY_HOLD"  # test hook: a folder where each task attempt waits (below)


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how to run the shard tasks: ``address`` (``local``, ``auto``, ``host:port``,
    ``ray://host:port``), ``retries`` (runs after a worker dies), ``tasks`` (at most this many
    at once; default: the cluster's CPUs, and for ``local`` this machine's)."""

    address: str = LOCAL
    retries: int = DEFAULT_RETRIES
    tasks: int | None = None

    def __post_init__(self):
        if self.retries < 0 or (self.tasks is not None and self.tasks < 1):
            raise HakubooruError("Ray task retries must be at least 0 and tasks at least 1")


def import_ray():
    """The ``ray`` module, or one line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise HakubooruError(f"--ray needs Ray, an optional dependency: {EXTRA}") from None
    return ray


class RayShards:
    """A connection to a Ray cluster (``with`` block) that builds shards as tasks."""

    def __init__(self, options: RayOptions, plan: dict, build_shard):
        self.options = options
        self.plan = plan
        self.build_shard = build_shard  # builder._build_shard (passed in: builder imports this module)
        self.retries = 0  # task attempts beyond the first, counted by the tasks themselves
        self.ray = import_ray()
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        kwargs = {"address": self.options.address, "log_to_driver": False,
                  "logging_level": logging.ERROR, "configure_logging": True}
        if self.options.address == LOCAL:
            kwargs.update(num_cpus=self.options.tasks or os.cpu_count(), include_dashboard=False)
        # ray.init installs a SIGTERM handler (sys.exit) that outlives the build, and every process
        # forked later inherits it: the one from before comes back last, after the shutdown
        self._stack.callback(_set_sigterm, signal.getsignal(signal.SIGTERM))
        try:
            self.ray.init(**kwargs)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError (a bad address)
            with contextlib.suppress(Exception):
                self.ray.shutdown()  # whatever a failed start left running
            self._stack.close()
            raise HakubooruError(f"cannot {'start' if self.options.address == LOCAL else 'reach'} "
                                 f"Ray at {self.options.address}: {_first_line(e)}") from None
        self._stack.callback(self.ray.shutdown)
        self._stack.enter_context(sigterm_interrupts())  # after init: Ray installs its own
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def logs(self) -> str:
        """Where this session's Ray logs are (named in error lines)."""
        with contextlib.suppress(Exception):
            return str(Path(self.ray.get_runtime_context().get_temp_dir()) / "session_latest" / "logs")
        return "the Ray session's logs folder"

    def run(self, tasks, out: str, policy):
        """Build the shards of ``tasks`` ((k, entries) pairs) as Ray tasks; yields sidecars as
        shards finish (the shape of builder._run)."""
        ray = self.ray
        limit = self.options.tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        attempts = ray.remote(num_cpus=0)(_Attempts).remote()
        task = ray.remote(num_cpus=1, max_retries=self.options.retries)(_shard_task)
        out = os.path.abspath(out)
        running: dict = {}  # ObjectRef -> shard number
        try:
            for k, entries in tasks:
                running[task.remote(self.build_shard, out, k, _absolute(entries), policy, self.plan, attempts)] = k
                if len(running) >= limit:
                    yield from self._collect(running)
            while running:
                yield from self._collect(running)
            self.retries = ray.get(attempts.retries.remote())
        finally:
            self._cancel(list(running))

    def _cancel(self, refs: list) -> None:
        """Stop the tasks of ``refs`` and take their outcomes (Ray prints an error nobody took)."""
        if not refs:
            return
        for ref in refs:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        with contextlib.suppress(Exception):
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
            for ref in ready:
                with contextlib.suppress(Exception):
                    self.ray.get(ref)

    def _collect(self, running: dict):
        ready, _ = self.ray.wait(list(running), num_returns=1, timeout=None)
        for ref in ready:
            k = running.pop(ref)
            yield self._result(ref, k)

    def _result(self, ref, k: int) -> dict:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as e:  # raised in the task: the local build's exception
            if e.cause is not None:
                raise e.cause from None
            raise HakubooruError(f"building {mf.shard_name(k)} on Ray failed: {_first_line(e)}") from None
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError,
                exceptions.LocalRayletDiedError, exceptions.ObjectLostError) as e:
            raise HakubooruError(
                f"the Ray worker building {mf.shard_name(k)} died in each of its "
                f"{self.options.retries + 1} runs (--ray-retries {self.options.retries}): "
                f"{_first_line(e)}; Ray's logs: "
                f"{self.logs()}") from None


class _Attempts:
    """A Ray actor counting the attempts of each shard's task."""

    def __init__(self):
        self.counts: dict[int, int] = {}

    def start(self, k: int) -> int:
        self.counts[k] = self.counts.get(k, 0) + 1
        return self.counts[k]

    def retries(self) -> int:
        return sum(n - 1 for n in self.counts.values())


def _shard_task(build_shard, out: str, k: int, entries: list, policy, plan: dict, attempts) -> dict:
    """The Ray task body: ``build_shard`` (builder._build_shard) once the folder is seen and the
    shard's writer lock is held."""
    import ray

    ray.get(attempts.start.remote(k))
    _hold_for_test(k)
    if mf.read_json(Path(out) / mf.PLAN_FILE) != plan:
        raise HakubooruError(
            f"Ray node {socket.gethostname()} does not see the output folder {out} (no plan file "
            f"{mf.PLAN_FILE} there, or another one); every node must mount it at the same path "
            "(a shared file system)")
    with BuildLock(Path(out)) as lock, lock.writing(k):
        return build_shard(out, k, entries, policy)


def _hold_for_test(k: int) -> None:
    """Test hook: with ``$HAKUBOORU_TEST_RAY_HOLD`` set to a folder, write ``<k>.<pid>`` there and
    wait until ``release`` or ``release-<k>`` exists (so a test can kill a worker mid-shard)."""
    folder = os.environ.get(HOLD_ENV)
    if not folder:
        return
    folder = Path(folder)
    (folder / f"{k}.{os.getpid()}").touch()
    while not ((folder / "release").exists() or (folder / f"release-{k}").exists()):
        time.sleep(0.02)


def _absolute(entries: list) -> list:
    """Entries with absolute archive paths (a worker's working folder is not the driver's)."""
    return [(i, caption, record, None if m is None else dataclasses.replace(m, path=os.path.abspath(m.path)))
            for i, caption, record, m in entries]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _set_sigterm(handler) -> None:
    with contextlib.suppress(ValueError, TypeError):  # not the main thread; None: not set from Python
        signal.signal(signal.SIGTERM, handler)

