"""build_shards(): a selection + image archives -> webdataset shards, manifest and index.

Shard assignment is a pure function of the selection: shard ``k`` is given the
selected ids ``ids[k*shard_size:(k+1)*shard_size]`` (in id order) and holds those of
them that were written. A skipped post leaves its shard one sample short and never
shifts another shard, so resuming and partitioning do not depend on earlier results.
Part ``i/N`` builds the shards ``k`` with ``k % N == i``.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import manifest as mf
from .buildlock import BuildLock, remove_temporaries
from .captioner import Captioner
from .db import fingerprint, open_db
from .errors import HakubooruError
from .hub import HubSource, is_hub
from .hubfetch import ShardStager
from .images import IMAGE_EXTS, OWN_FORMAT, BadImage, ImagePolicy, prepare
from .procs import forking, worker_start
from .raybuild import DEFAULT_RETRIES, RayOptions, RayShards, import_ray
from .selector import Selection, load_selection
from .shardwriter import CHECKSUM, ShardWriter, member_hash
from .sources import ImageSource, MemberReader, Unavailable
from .tagcounts import add_tags, merge_counts, record_tags, write_tag_counts

ROW_COLUMNS = ("id", "image_offset", "image_size", "txt_offset", "txt_size",
               "json_offset", "json_size", "width", "height", "ext", *mf.HASH_COLUMNS)


@dataclass
class BuildResult:
    """What one run of build_shards did (this part only), and whether the folder is complete."""

    out: Path
    shard_count: int
    shards_built: int = 0
    shards_verified: int = 0
    selected: int = 0
    written: int = 0
    skipped: dict = field(default_factory=dict)
    complete: bool = False
    seconds: float = 0.0
    ignored_members: int = 0  # archive members not named <id>.<ext>, in the tars looked at
    cut_short_tars: list = field(default_factory=list)  # source tars ending inside a member
    ray_retries: int = 0  # Ray task attempts beyond the first (a worker died)

    def summary(self) -> str:
        """One line of counts."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        state = "complete: manifest.json written" if self.complete else "other parts pending"
        return (f"{self.out}: {self.shards_built} shards built, {self.shards_verified} verified "
                f"(of {self.shard_count}); {self.selected} posts, {self.written} written, "
                f"{skipped} skipped{f' ({reasons})' if reasons else ''}, "
                f"{self.ignored_members} archive members ignored"
                + (f", {len(self.cut_short_tars)} source tars cut short (first: "
                   f"{self.cut_short_tars[0]})" if self.cut_short_tars else "")
                + (f", {self.ray_retries} Ray task retries" if self.ray_retries else "")
                + f"; in {self.seconds:.1f} s; {state}")


def parse_part(part) -> tuple[int, int]:
    """``"i/N"`` or ``(i, N)`` with 0 <= i < N -> (i, N)."""
    try:
        i, n = (int(v) for v in (part.split("/") if isinstance(part, str) else part))
    except (ValueError, TypeError):
        raise HakubooruError(f"part must look like i/N (e.g. 0/4), not {part!r}") from None
    if not 0 <= i < n:
        raise HakubooruError(f"part {i}/{n}: need 0 <= i < N")
    return i, n


def _check_one_extension(located, policy: ImagePolicy) -> None:
    """Without --format, refuse (before writing anything) images of several extensions, and
    --max-pixels on images that cannot be written in their own format (avif, bmp)."""
    if policy.image_format is not None:
        return
    exts = Counter(IMAGE_EXTS[e] for e in located.exts[located.found].tolist() if e in IMAGE_EXTS)
    if len(exts) > 1:
        found = ", ".join(f"{e} {n}" for e, n in sorted(exts.items()))
        raise HakubooruError(
            f"the selected images have mixed formats ({found}) and a dataset has one extension; "
            "re-encode them with --format webp|jpeg|png")
    stuck = sorted(e for e in exts if e not in OWN_FORMAT)
    if policy.max_pixels is not None and stuck:
        raise HakubooruError(f"--max-pixels cannot downscale .{stuck[0]} images in their own "
                             "format; choose one with --format webp|jpeg|png")


def _build_shard(out: str, k: int, entries: list, policy: ImagePolicy) -> dict:
    """Write and commit shard ``k``; returns its sidecar."""
    return _commit_shard(out, k, *_write_shard(out, k, entries, policy))


def _write_shard(out: str, k: int, entries: list, policy: ImagePolicy) -> tuple[ShardWriter, dict]:
    """Write shard ``k`` from ``(id, caption, record, member)`` entries under its temporary
    name; returns the writer (to commit) and the shard's sidecar."""
    out = Path(out)
    rows = {name: [] for name in ROW_COLUMNS}
    skipped = []
    tags: dict[str, int] = {}
    writer = ShardWriter(out / mf.shard_name(k))
    try:
        with MemberReader() as reader:
            for post_id, caption, record, member in entries:
                if isinstance(member, Unavailable):
                    skipped.append([post_id, member.reason, member.detail])
                    continue
                if member is None or record is None:
                    skipped.append([post_id, "missing" if member is None else "no_record", ""])
                    continue
                data = reader.read(member)
                try:
                    if len(data) < member.size:
                        raise BadImage("truncated", "archive ends inside the member")
                    stored = prepare(data, member.ext, policy)
                except BadImage as e:
                    skipped.append([post_id, e.reason, e.detail])
                    continue
                record = {**record, "width": stored.width, "height": stored.height}
                add_tags(tags, record_tags(record))
                members = {stored.ext: stored.data,
                           "json": json.dumps(record, ensure_ascii=False).encode(),
                           "txt": caption.encode()}
                spans = writer.write(str(post_id), members)
                for name, ext in (("image", stored.ext), ("txt", "txt"), ("json", "json")):
                    rows[f"{name}_offset"].append(spans[ext][0])
                    rows[f"{name}_size"].append(spans[ext][1])
                    rows[f"{name}_xxh3"].append(member_hash(members[ext]))
                rows["id"].append(post_id)
                rows["width"].append(stored.width)
                rows["height"].append(stored.height)
                rows["ext"].append(stored.ext)
        checksum, size = writer.finish()
    except BaseException:
        writer.abort()
        raise
    sidecar = {"name": mf.shard_name(k), "samples": writer.count, "size": size,
               CHECKSUM: checksum, "rows": rows, "skipped": skipped, "tags": tags}
    return writer, sidecar


def _write_tag_counts(out: Path, manifest: dict, sidecars: list[dict]) -> None:
    """tag_counts.parquet from the shards' own counts (sidecars of an older hakubooru have none:
    then the trainer counts once)."""
    if all("tags" in s for s in sidecars):
        write_tag_counts(out, merge_counts(s["tags"] for s in sidecars), manifest["fingerprint"])


def _commit_shard(out: str, k: int, writer: ShardWriter, sidecar: dict) -> dict:
    """Make shard ``k`` durable, then visible: fsync, sidecar, rename. A crash before the
    rename leaves only a temporary file, which the next run rebuilds."""
    try:
        writer.sync()
        mf.write_sidecar(Path(out), k, sidecar)
    except BaseException:
        writer.abort()
        raise
    writer.publish()
    return sidecar


def _shard_entries(pending, blocks, ids, located, captions):
    """Yield (k, entries) per pending shard, pulling captions (id order) as needed."""
    next_caption = next(captions, None)
    for k in pending:
        entries = []
        for i in blocks[k]:
            post_id, member = int(ids[i]), located.member(i)
            caption = record = None
            if member is not None:
                while next_caption is not None and next_caption[0] < post_id:
                    next_caption = next(captions, None)
                if next_caption is not None and next_caption[0] == post_id:
                    _, caption, record = next_caption
            entries.append((post_id, caption, record, member))
        yield k, entries


def build_shards(db, images, selection, out, *, captioner=None, caption_options=None,
                 shard_size: int = 1000,
                 workers: int = 1, part=None, image_format: str | None = None,
                 quality: int = 90, max_pixels: int | None = None,
                 validate: str = "standard", cache_dir=None, progress: bool = True,
                 ray: str | None = None, ray_retries: int = DEFAULT_RETRIES,
                 ray_tasks: int | None = None, images_index: str | None = None,
                 connections: int = 16, fetch_retries: int = 5) -> BuildResult:
    """Build (or resume) the shard folder ``out`` from ``selection`` (a Selection or its
    Parquet path), ``db`` (path or open_db handle) and the archives under ``images``.

    Finished shards are verified by checksum and kept; the rest are built, ``workers``
    processes in parallel, one shard per task. When all shards are present (this run or
    other parts), manifest.json, index.parquet and skipped.parquet are written.
    Output bytes do not depend on ``workers``, ``part`` or interruptions.
    ``caption_options``: keyword arguments of the default ``Captioner(db, ...)`` (separator,
    keep_separator, groups, ...; not with ``captioner``); recorded in the plan like all of
    the captioner's settings, so resuming with other ones is refused.
    ``ray``: build the pending shards as tasks on the Ray cluster at this address (``"local"``:
    a Ray started in this process; ``"auto"``, ``"host:port"``, ``"ray://host:port"``), each
    task run again up to ``ray_retries`` times if its worker dies, at most ``ray_tasks`` at once
    (default: the cluster's CPUs); same bytes (hakubooru.raybuild).
    ``images`` may be ``hf://datasets/OWNER/NAME[@REVISION]`` (hakubooru.hub; ``images_index``
    names its index repository where it is not a known one): each pending shard's images are
    fetched by Range reads on ``connections`` connections, verified, and give the same bytes
    (a failed read is tried ``fetch_retries`` more times, then the image is skipped as
    ``fetch_failed``).
    """
    started = time.perf_counter()
    if shard_size < 1 or workers < 1:
        raise HakubooruError("shard size and workers must be at least 1")
    part_i, part_n = parse_part(part) if part is not None else (0, 1)
    ray_options = RayOptions(ray, ray_retries, ray_tasks) if ray is not None else None
    if ray_options is not None:
        import_ray()  # refused before anything is written
    policy = ImagePolicy(image_format, quality, max_pixels, validate)
    out = Path(out)
    source = _open_source(images, images_index, cache_dir, out)
    db = open_db(db) if isinstance(db, (str, Path)) else db
    if not isinstance(selection, Selection):
        selection = load_selection(selection)
    selection.check(db)
    if captioner is not None and caption_options:
        raise HakubooruError("pass either a captioner or caption_options, not both")
    captioner = captioner if captioner is not None else Captioner(db, **(caption_options or {}))

    ids = np.asarray(selection.ids, np.int64)
    if np.any(np.diff(ids) <= 0):  # Selection sorts them; shard assignment relies on it
        raise HakubooruError("selection ids are not sorted and unique (shards are assigned by "
                             "position in id order)")
    shard_count = -(-len(ids) // shard_size)
    located = source.locate(ids, progress=progress)
    _check_one_extension(located, policy)
    plan = {
        "format": mf.FORMAT,
        "db_fingerprint": fingerprint(db),
        "selection": {"expression": selection.expression, "seeds": selection.meta.get("seeds", []),
                      "count": int(len(ids)), "sha256": selection.digest},
        "captioner": captioner.settings(),
        "image_policy": policy.to_dict(),
        "shard_size": shard_size,
        "shard_count": shard_count,
    }
    if isinstance(source, HubSource):
        plan["images_source"] = source.describe()  # the commits: a resumed build reads the same files
    mf.check_or_write_plan(out, plan)
    with BuildLock(out) as lock:
        blocks = [range(k * shard_size, min(len(ids), (k + 1) * shard_size))
                  for k in range(shard_count)]
        mine = [k for k in range(shard_count) if k % part_n == part_i]
        lock.take_shards(mine, mf.shard_name)
        remove_temporaries(out, [mf.shard_name(k) for k in mine])  # left by a killed run
        remove_temporaries(out / mf.PARTS_DIR, [mf.sidecar_path(out, k).name for k in mine])
        result = BuildResult(out, shard_count, selected=sum(len(blocks[k]) for k in mine),
                             ignored_members=source.ignored_members,
                             cut_short_tars=source.cut_short_tars)
        pending = []
        for k, sidecar in zip(mine, tqdm(_verify(out, mine, workers), total=len(mine), leave=False,
                                         desc="verifying finished shards", unit="shard",
                                         disable=not progress)):
            if sidecar is None:
                pending.append(k)
            else:
                _count(result, sidecar)
                result.shards_verified += 1

        rows = np.concatenate([np.arange(blocks[k].start, blocks[k].stop) for k in pending] or [[]])
        rows = rows.astype(np.int64)
        captions = iter(captioner.captions(ids[rows[located.found[rows]]]))
        tasks = _shard_entries(pending, blocks, ids, located, captions)
        stager = None
        if isinstance(source, HubSource) and pending:
            stager = ShardStager(source, out, [mf.shard_name(k) for k in mine], connections,
                                 fetch_retries, progress=progress, total=int(located.found[rows].sum()))
            tasks = stager.stage(tasks, mf.shard_name)
        size = 0
        on_ray = RayShards(ray_options, plan, _build_shard) if ray_options and pending else None
        with on_ray or contextlib.nullcontext():  # a Ray connection, or none
            run = on_ray.run if on_ray else functools.partial(_run, workers=workers)
            bar = tqdm(total=sum(len(blocks[k]) for k in pending), desc="building shards",
                       unit="img", disable=not progress, smoothing=0.1)
            shards = run(tasks, str(out), policy)
            try:
                for sidecar in shards:
                    _count(result, sidecar)
                    result.shards_built += 1
                    if stager is not None:
                        stager.done(sidecar["name"])
                    size += sidecar["size"]
                    bar.update(sidecar["samples"] + len(sidecar["skipped"]))
                    bar.set_postfix(written=result.written, skipped=sum(result.skipped.values()),
                                    size=f"{size / 2**20:.1f} MiB")
            finally:
                shards.close()  # a stopped build cancels what is still running (Ray: before shutdown)
                if stager is not None:
                    tasks.close()  # stops the fetching of the next shard
                    stager.close()
                bar.close()
        result.ray_retries = on_ray.retries if on_ray else 0
        with lock.shared_files():
            result.complete = mf.assemble(out, plan, functools.partial(_write_tag_counts, out)) is not None
    result.seconds = time.perf_counter() - started
    print(result.summary(), file=sys.stderr)  # even when progress bars are off
    return result


def _open_source(images, images_index, cache_dir, out: Path):
    """The local ImageSource, or for ``hf://`` the HubSource (at the commits a resumed build
    recorded, where no revision is given)."""
    if not is_hub(images):
        if images_index is not None:
            raise HakubooruError("--images-index goes with --images hf://datasets/...")
        return ImageSource.open(images, cache_dir)
    plan = mf.read_json(out / mf.PLAN_FILE) if (out / mf.PLAN_FILE).is_file() else None
    return HubSource.open(images, images_index, pinned=(plan or {}).get("images_source"))


def _count(result: BuildResult, sidecar: dict) -> None:
    result.written += sidecar["samples"]
    for _, reason, _ in sidecar["skipped"]:
        result.skipped[reason] = result.skipped.get(reason, 0) + 1


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    """A started pool of ``workers`` forked processes (`python -m hakubooru` cannot be
    re-imported by spawned children)."""
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                  initializer=worker_start, initargs=(os.getpid(),))
    with forking():
        pool.submit(int)  # a fork pool starts all its workers at its first task
    return pool


def _verify(out: Path, shards: list, workers: int):
    """Each shard's sidecar if it is finished and its checksum checks out, else None (in order)."""
    check = functools.partial(mf.finished_sidecar, out, verify=True)
    if workers == 1 or not shards:
        yield from map(check, shards)
        return
    with _pool(workers) as pool:
        yield from pool.map(check, shards)


def _run(tasks, out: str, policy: ImagePolicy, workers: int):
    """Build the shards of ``tasks``; yields sidecars as shards finish."""
    if workers == 1:
        # the disk flush of shard k (fsync releases the GIL) overlaps the writing of shard k+1
        with cf.ThreadPoolExecutor(1) as committer:
            pending = None
            for k, entries in tasks:
                writer, sidecar = _write_shard(out, k, entries, policy)
                if pending is not None:
                    yield pending.result()
                pending = committer.submit(_commit_shard, out, k, writer, sidecar)
            if pending is not None:
                yield pending.result()
        return
    with _pool(workers) as pool:
        running = set()
        for k, entries in tasks:
            running.add(pool.submit(_build_shard, out, k, entries, policy))
            if len(running) >= 2 * workers:
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                yield from (f.result() for f in done)
        for f in cf.as_completed(running):
            yield f.result()


def merge(out) -> dict:
    """Assemble manifest.json and the index of a folder built in parts (all must be finished);
    prints one line of counts."""
    out = Path(out)
    plan = mf.load_plan(out)
    missing = [mf.shard_name(k) for k in range(plan["shard_count"])
               if mf.finished_sidecar(out, k, verify=False) is None]
    if missing:
        raise HakubooruError(
            f"{out}: {len(missing)} of {plan['shard_count']} shards not finished "
            f"(first: {', '.join(missing[:3])}); build the remaining parts first")
    with BuildLock(out) as lock, lock.shared_files():
        manifest = mf.assemble(out, plan, functools.partial(_write_tag_counts, out))
    counts = manifest["counts"]
    print(f"{out}: merged {plan['shard_count']} shards; {counts['written']} written, "
          f"{counts['skipped']} skipped", file=sys.stderr)
    return manifest
