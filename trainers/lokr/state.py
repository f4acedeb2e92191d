"""Training state on disk: written atomically with a checksum, the last K kept, the newest valid one read back.

A state file is ``state-<step>.state`` in the run's ``states/`` folder:

    HAKUSTATE2\\n<sha256 of the body, 64 hex digits>\\n<body: safetensors>

The body is a safetensors file holding every tensor of the payload (LoKr weights, the 8-bit
optimizer state, ...) with the payload's structure — nested dicts and lists of numbers and
strings, tensors by reference — as JSON in its metadata: no pickle, and reading it back is a
copy rather than an unpickling of a thousand objects. The file is written to a temporary name,
fsynced, then renamed, so an interrupted write never leaves a file that looks complete; a file
whose checksum does not match (disk trouble, a copy cut short) is reported and the previous
state is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from hakubooru.errors import HakubooruError, reporting_full_disk
from trainers.lokr.safetensors_file import file_chunks

MAGIC = b"HAKUSTATE2\n"
HEADER = len(MAGIC) + 65  # the magic line, then 64 hex digits of sha256 and a newline
_NAME = re.compile(r"^state-(\d+)\.state$")


def _pack(obj, tensors: dict, seen: dict):
    """The JSON skeleton of ``obj``; its tensors go into ``tensors`` (one entry per tensor object)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen[id(obj)] = str(len(tensors))
            tensors[seen[id(obj)]] = obj.detach().cpu().contiguous()
        return {"t": seen[id(obj)]}
    if isinstance(obj, dict):
        return {"d": [[k, _pack(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l": [_pack(v, tensors, seen) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"a training state cannot hold {type(obj).__name__}")


def _unpack(node, tensors: dict):
    kind, value = next(iter(node.items()))
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {k: _unpack(v, tensors) for k, v in value}
    if kind == "l":
        return [_unpack(v, tensors) for v in value]
    return value


def state_dir(output: str | os.PathLike) -> Path:
    """Where a run writing to ``output`` keeps its states."""
    return Path(output) / "states"


def list_states(folder: str | os.PathLike) -> list[Path]:
    """State files in ``folder``, oldest first (by step in the name; temporaries ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_state(folder: str | os.PathLike, step: int, payload: dict, keep: int) -> Path:
    """Write ``payload`` as the state of optimizer step ``step`` atomically; keep the newest ``keep``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    skeleton = _pack(payload, tensors, {})
    metadata = {"hakubooru_state": json.dumps(skeleton)}
    size = HEADER + len(metadata["hakubooru_state"]) + sum(t.numel() * t.element_size() for t in tensors.values())
    final = folder / f"state-{step:08d}.state"
    tmp = folder / f".{final.name}.tmp"
    for stale in folder.glob(".state-*.state.tmp"):  # left by a killed run (one writer per run)
        stale.unlink()
    try:  # streamed tensor by tensor (no copy of the body in memory); the checksum goes in last
        with reporting_full_disk(final, size), open(tmp, "wb") as f:
            f.write(MAGIC + b"0" * 64 + b"\n")
            digest = hashlib.sha256()
            for chunk in file_chunks(tensors, metadata):
                digest.update(chunk)
                f.write(chunk)
            f.seek(len(MAGIC))
            f.write(digest.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_states(folder)[:-keep]:
        old.unlink()
    return final


def read_state(path: str | os.PathLike) -> dict:
    """Load one state file, checking its header and checksum; HakubooruError if it is damaged."""
    data = Path(path).read_bytes()
    header = HEADER
    if not data.startswith(MAGIC) or len(data) < header or data[header - 1:header] != b"\n":
        raise HakubooruError(f"{path} is not a complete training state (bad header)")
    if hashlib.sha256(data[header:]).hexdigest().encode() != data[len(MAGIC):header - 1]:
        raise HakubooruError(f"{path} is damaged or was cut short (checksum mismatch)")
    body = data[header:]
    metadata_size = int.from_bytes(body[:8], "little")
    skeleton = json.loads(json.loads(body[8:8 + metadata_size])["__metadata__"]["hakubooru_state"])
    return _unpack(skeleton, load_safetensors(body))


def load_latest_state(folder: str | os.PathLike) -> tuple[Path, dict]:
    """The newest state in ``folder`` that reads back whole; each damaged newer one is reported
    on stderr and skipped. HakubooruError when there is none."""
    states = list_states(folder)
    if not states:
        raise HakubooruError(f"no training state in {folder} (states are written every train.save_every steps)")
    for n, path in enumerate(reversed(states)):
        try:
            return path, read_state(path)
        except HakubooruError as e:
            more = n + 1 < len(states)
            print(f"warning: {e}" + ("; falling back to the previous state" if more else ""), file=sys.stderr)
    raise HakubooruError(f"every training state in {folder} is damaged ({len(states)}, newest "
                         f"{states[-1].name}); cannot resume: start a new run in another --output")


@dataclass
class Elastic:
    """How a state resumes on this run's GPU count and batch: the epoch plan's batch (that of
    the run's first start), the cursor in this run's micro-steps, the config keys allowed to
    change, and the line to print (empty when nothing changed)."""

    plan_batch: int
    cursor: int
    free_keys: frozenset
    line: str


def elastic_resume(path, state: dict, saved_cfg: dict, cfg: dict, world_size: int) -> Elastic:
    """Accept a state written on another number of GPUs (or per-GPU batch, or accumulation) when
    the global batch — per-GPU batch × accumulation × GPUs — is kept and the per-GPU batch divides
    the plan's batch: the run then reads the same plan in other micro-steps (same samples, same
    order, same draws). Else one line naming the numbers."""
    st, tc = saved_cfg["train"], cfg["train"]
    w0, b0, a0 = state["world_size"], st["batch_size"], st["grad_accum"]
    w, b, a = world_size, tc["batch_size"], tc["grad_accum"]
    plan_batch = state.get("plan_batch", b0 * w0)
    if (w0, b0, a0) == (w, b, a):
        return Elastic(plan_batch, state["cursor"], frozenset(), "")
    s0, s = b0 * a0 * w0, b * a * w
    if s != s0:
        hint = (f"; e.g. --set train.grad_accum={s0 // (b * w)}" if s0 % (b * w) == 0 else "")
        raise HakubooruError(f"{path} was written at a global batch of {s0} (per-GPU batch {b0} × accumulation "
                             f"{a0} × {w0} GPU(s)); this run has {s} ({b} × {a} × {w}): keep per-GPU batch × "
                             f"accumulation × GPUs to resume{hint}")
    if plan_batch % b:
        raise HakubooruError(f"{path}: a per-GPU batch of {b} does not divide the run's plan batch of {plan_batch} "
                             f"(per-GPU batch × GPUs at its first start); choose a divisor of {plan_batch}")
    line = (f"elastic resume: {w0} → {w} GPU(s), per-GPU batch {b0} → {b}, accumulation {a0} → {a}; global batch "
            f"{s} kept: the same samples in the same order (weights equal up to float summation order)")
    return Elastic(plan_batch, state["cursor"] * (b0 * w0) // (b * w), frozenset({"train.batch_size", "train.grad_accum"}),
                   line)
