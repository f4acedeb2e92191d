"""The bookkeeping files of a shard folder: plan, per-shard sidecars, manifest, index.

- ``.hakubooru-build.json`` (the plan): what the folder is being built from. Written
  before the first shard, once (parts starting together agree on the first one written);
  a later run (or another part) with different inputs is refused. The image archives are
  not part of it: resuming with other archives is not detected.
- ``.parts/shard-NNNNNN.json`` (sidecars): one per finished shard — its checksum, size,
  sample count, index rows and skipped posts. Written just before the shard is renamed
  into place, so a shard that exists always has one.
- ``manifest.json``, ``index.parquet``, ``skipped.parquet``, ``README.md`` (the dataset
  card, hakubooru.card): assembled from the sidecars
  once every shard is present, each under a temporary name then renamed into place.
  No timestamps: a re-run gives the same bytes.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from .buildlock import remove_temporaries
from .card import CARD_FILE, dataset_card
from .errors import HakubooruError, reporting_full_disk
from .shardwriter import CHECKSUM, file_checksum

FORMAT = "hakubooru-shards/1"
PLAN_FILE = ".hakubooru-build.json"
PARTS_DIR = ".parts"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.parquet"
SKIPPED_FILE = "skipped.parquet"
TAG_COUNTS_FILE = "tag_counts.parquet"  # hakubooru.tagcounts

INDEX_SCHEMA = pa.schema([
    ("id", pa.int64()), ("shard", pa.string()),
    ("image_offset", pa.int64()), ("image_size", pa.int64()),
    ("txt_offset", pa.int64()), ("txt_size", pa.int64()),
    ("json_offset", pa.int64()), ("json_size", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("ext", pa.string()),
    ("image_xxh3", pa.uint64()), ("txt_xxh3", pa.uint64()), ("json_xxh3", pa.uint64()),
])
HASH_COLUMNS = ("image_xxh3", "txt_xxh3", "json_xxh3")  # shardwriter.member_hash of each member
SKIPPED_SCHEMA = pa.schema([("id", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])


def shard_name(k: int) -> str:
    """File name of shard number ``k``."""
    return f"shard-{k:06d}.tar"


def dump_json(obj, indent: int | None = 2) -> bytes:
    """Canonical JSON bytes (sorted keys, trailing newline; ``indent=None``: compact)."""
    separators = (",", ":") if indent is None else None
    return (json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False,
                       separators=separators) + "\n").encode()


def _write_tmp(path: Path, data: bytes) -> Path:
    # a name of its own: parts (processes, possibly on several machines) may start at once
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with reporting_full_disk(path, len(data)), open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file under a temporary name, then rename it into place (the temporary file is
    removed when the rename fails)."""
    tmp = _write_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet(path: Path, table: pa.Table) -> None:
    """Write a Parquet table atomically (a reader never sees half a file)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` whole with ``data`` unless it exists (True if this call created it):
    of several processes creating it at once, exactly one succeeds."""
    tmp = _write_tmp(path, data)
    try:
        os.link(tmp, path)  # fails if path exists, where os.replace would overwrite it
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def read_json(path: Path):
    """A JSON file's content, or None if it is absent or unreadable (e.g. cut short)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def check_or_write_plan(out: Path, plan: dict, what: str = "hakubooru shard folder") -> None:
    """Refuse a folder built from other inputs; start a new one with the plan file.
    ``what`` names the kind of folder in the messages (the latent cache uses this too)."""
    if out.exists() and not out.is_dir():
        raise HakubooruError(f"{out} is a file, not a folder; choose an output folder")
    existing = read_json(out / PLAN_FILE)
    if existing is None:
        ours = (PARTS_DIR, PLAN_FILE, f".{PLAN_FILE}.")  # another part starting at the same moment
        if out.exists() and any(not p.name.startswith(ours) for p in out.iterdir()):
            raise HakubooruError(
                f"{out} is not empty and is not a {what}; use a new output folder")
        out.mkdir(parents=True, exist_ok=True)
        created = create_once(out / PLAN_FILE, dump_json(plan))
        existing = plan if created else read_json(out / PLAN_FILE)
        if existing is None:
            raise HakubooruError(f"{out / PLAN_FILE} is damaged; use a new output folder")
    differ = sorted(k for k in set(plan) | set(existing) if plan.get(k) != existing.get(k))
    if differ:
        raise HakubooruError(
            f"{out} was built from other inputs (different {', '.join(differ)}); "
            "use a new output folder")
    (out / PARTS_DIR).mkdir(exist_ok=True)


def load_plan(out: Path) -> dict:
    """The plan of an existing shard folder (for --merge)."""
    plan = read_json(Path(out) / PLAN_FILE)
    if plan is None:
        raise HakubooruError(f"{out}: not a hakubooru shard folder (no {PLAN_FILE})")
    return plan


def sidecar_path(out: Path, k: int) -> Path:
    """Where shard ``k``'s sidecar lives."""
    return out / PARTS_DIR / (shard_name(k)[:-4] + ".json")


def write_sidecar(out: Path, k: int, sidecar: dict) -> None:
    """Write shard ``k``'s sidecar (compact JSON, atomically)."""
    write_atomic(sidecar_path(out, k), dump_json(sidecar, indent=None))


def finished_sidecar(out: Path, k: int, verify: bool) -> dict | None:
    """The sidecar of shard ``k`` if the shard is finished: present, right size and, with
    ``verify``, the recorded checksum (reads the whole shard). None means: build it again."""
    sidecar = read_json(sidecar_path(out, k))
    tar = out / shard_name(k)
    if sidecar is None or not tar.is_file() or tar.stat().st_size != sidecar["size"]:
        return None
    if any(c not in sidecar["rows"] for c in HASH_COLUMNS):  # written before member hashes
        return None
    if verify and file_checksum(tar) != sidecar.get(CHECKSUM):
        return None
    return sidecar


def assemble(out: Path, plan: dict, before_manifest=None) -> dict | None:
    """Write manifest.json, index.parquet and skipped.parquet if every shard is finished
    (sizes checked against the sidecars); returns the manifest, or None if shards are missing.
    ``before_manifest(manifest, sidecars)`` writes what else belongs to the finished folder
    (manifest.json, written last, marks it complete). Hold the folder's BuildLock around it."""
    sidecars = [finished_sidecar(out, k, verify=False) for k in range(plan["shard_count"])]
    if any(s is None for s in sidecars):
        return None
    remove_temporaries(out, (PLAN_FILE, MANIFEST_FILE, INDEX_FILE, SKIPPED_FILE, TAG_COUNTS_FILE))  # of killed runs
    columns = {name: [] for name in INDEX_SCHEMA.names}
    skipped = {name: [] for name in SKIPPED_SCHEMA.names}
    reasons: dict[str, int] = {}
    for sidecar in sidecars:
        for name in INDEX_SCHEMA.names:
            columns[name].extend(sidecar["rows"][name] if name != "shard"
                                 else [sidecar["name"]] * sidecar["samples"])
        for post_id, reason, detail in sidecar["skipped"]:
            skipped["id"].append(post_id)
            skipped["reason"].append(reason)
            skipped["detail"].append(detail)
            reasons[reason] = reasons.get(reason, 0) + 1
    write_parquet(out / INDEX_FILE, pa.table(columns, schema=INDEX_SCHEMA))
    write_parquet(out / SKIPPED_FILE, pa.table(skipped, schema=SKIPPED_SCHEMA))
    written = sum(s["samples"] for s in sidecars)
    manifest = {
        **plan,
        "counts": {"selected": plan["selection"]["count"], "written": written,
                   "skipped": sum(reasons.values()), "skipped_by_reason": reasons},
        "shards": [{"name": s["name"], "samples": s["samples"], "size": s["size"],
                    CHECKSUM: s[CHECKSUM]} for s in sidecars],
        "files": {"index": INDEX_FILE, "skipped": SKIPPED_FILE, "card": CARD_FILE},
    }
    # identifies the dataset's content (trainers check resumed states against it)
    # where the images came from (hf:// commits) is not content: the same shards, the same print
    content = {k: v for k, v in manifest.items() if k != "images_source"}
    manifest["fingerprint"] = "xxh3_128:" + xxhash.xxh3_128(dump_json(content)).hexdigest()
    image_ext = columns["ext"][0] if columns["ext"] else "webp"  # no sample: any image column
    write_atomic(out / CARD_FILE, dataset_card(manifest, image_ext))  # a function of the manifest
    if before_manifest is not None:
        before_manifest(manifest, sidecars)
    write_atomic(out / MANIFEST_FILE, dump_json(manifest))
    return manifest
