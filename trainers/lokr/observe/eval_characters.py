"""The characters of the CCIP benchmark (``python -m trainers.lokr eval``), their prompts,
seeds and reference images, all read from a shard folder.

**Rule.** A *single-character sample* is a record whose ``keep`` list holds exactly one
people-count tag, and that tag is ``1girl``, ``1boy`` or ``1other``, and exactly one character
tag (tag types from the database the shards were built from: the records keep character,
copyright and artist tags in one list). Candidates are the character tags with at least
``references`` single-character samples; the benchmark takes the ``characters`` most frequent
(by that count, then by name). Each character's references are its ``references``
single-character samples with the smallest ``hash64(seed, post id)``; its prompt is
``<people>, <character>, <series>, masterpiece, newest, safe`` with its most common people
tag and copyright tag among those samples (ties by name; no series when none has one).

**Seeds.** Image ``k`` of a character renders from ``hash64(seed, key, k)`` (63 bits), where
``key`` is the first 8 bytes of the SHA-256 of the character's name: a character's images do
not depend on which other characters are evaluated.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from hakubooru.errors import HakubooruError
from hakubooru.rng import hash64
from hakubooru.shardfolder import read_index, shard_runs
from hakubooru.tagrules import PEOPLE_COUNT_TAGS, format_tag

SINGLE_PEOPLE = ("1girl", "1boy", "1other")
QUALITY, YEAR, RATING = "masterpiece", "newest", "safe"  # the card's prompt tail
_PEOPLE = frozenset(format_tag(t) for t in PEOPLE_COUNT_TAGS)

CHARACTERS_SCHEMA = pa.schema([
    ("rank", pa.int32()), ("character", pa.string()), ("samples", pa.int64()), ("people", pa.string()),
    ("series", pa.string()), ("prompt", pa.string()), ("key", pa.uint64()),
    ("reference_ids", pa.list_(pa.int64())),
])


@dataclass(frozen=True)
class Reference:
    """Where a reference image lies: post id, shard file, byte span, extension."""

    id: int
    shard: str
    offset: int
    size: int
    ext: str


@dataclass(frozen=True)
class Character:
    """One benchmark character: name, single-character sample count, prompt parts, references."""

    rank: int
    name: str
    samples: int
    people: str
    series: str
    references: tuple[Reference, ...]

    @property
    def key(self) -> int:
        """64 bits from the name, the character's part of every seed."""
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "big")

    @property
    def prompt(self) -> str:
        """``<people>, <character>, <series>, <quality>, <year>, <rating>``."""
        return ", ".join(t for t in (self.people, self.name, self.series, QUALITY, YEAR, RATING) if t)

    def seed(self, seed: int, image: int) -> int:
        """The render seed of image ``image`` (fits torch's manual_seed)."""
        return hash64(seed, self.key, image) >> 1

    @property
    def slug(self) -> str:
        """A file-system-safe folder name, unique per character."""
        safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in self.name)[:40]
        return f"{safe}-{self.key:016x}"[:57]


def tag_types(db) -> dict[str, str]:
    """Tag name -> type (character, copyright, ...) from the database's tag table, under both
    the formatted name (the default caption style) and danbooru's own (``--underscores keep``)."""
    from hakubooru.db import Tag, open_db

    open_db(db)  # binds the models
    types = {}
    for name, kind in Tag.select(Tag.name, Tag.type).tuples().iterator():
        types.setdefault(format_tag(name), kind)
        types.setdefault(name, kind)
    return types


def single_character(keep, types: dict) -> tuple[str, str, list[str]] | None:
    """(people tag, character, copyright tags) of a single-character record's keep list, else None."""
    people = [t for t in keep if t in _PEOPLE]
    chars = [t for t in keep if types.get(t) == "character"]
    if len(people) != 1 or people[0] not in SINGLE_PEOPLE or len(chars) != 1:
        return None
    return people[0], chars[0], [t for t in keep if types.get(t) == "copyright"]


def choose_characters(shards: Path, types: dict, *, characters: int, references: int, seed: int,
                      progress: bool = True) -> list[Character]:
    """The benchmark's characters from the records of ``shards`` (module docstring's rule)."""
    table = read_index(shards, ["id", "shard", "json_offset", "json_size", "image_offset", "image_size", "ext"])
    shard = table.column("shard").combine_chunks().dictionary_encode()
    names = [str(s) for s in shard.dictionary.to_pylist()]
    codes = shard.indices.to_numpy()
    col = {c: table.column(c).to_numpy() for c in ("id", "json_offset", "json_size", "image_offset", "image_size")}
    exts = table.column("ext").to_pylist()
    found: dict[str, list] = {}
    bar = tqdm(total=len(codes), desc="reading records", unit="rec", disable=not progress, file=sys.stderr)
    for rows in shard_runs(codes, col["json_offset"]):
        path = shards / names[codes[rows[0]]]
        try:
            with open(path, "rb") as f:
                for r in rows:
                    if col["json_size"][r] < 0:
                        continue
                    f.seek(col["json_offset"][r])
                    try:
                        record = json.loads(f.read(col["json_size"][r]))
                    except ValueError:
                        raise HakubooruError(f"{path}: the .json record of post {col['id'][r]} is not valid JSON") from None
                    hit = single_character(record.get("keep", ()), types) if isinstance(record, dict) else None
                    if hit is not None:
                        ref = Reference(int(col["id"][r]), path.name, int(col["image_offset"][r]),
                                        int(col["image_size"][r]), exts[r])
                        found.setdefault(hit[1], []).append((hit[0], hit[2], ref))
        except OSError as e:
            raise HakubooruError(f"cannot read {path}: {e.strerror or e}") from None
        bar.update(len(rows))
    bar.close()
    ranked = sorted(((-len(v), name) for name, v in found.items() if len(v) >= references))
    out = []
    for rank, (neg, name) in enumerate(ranked[:characters]):
        samples = found[name]
        people = _most_common(p for p, _, _ in samples)
        series = _most_common(c for _, cs, _ in samples for c in cs)
        refs = sorted((s[2] for s in samples), key=lambda ref: (hash64(seed, ref.id), ref.id))[:references]
        out.append(Character(rank, name, -neg, people, series, tuple(sorted(refs, key=lambda ref: ref.id))))
    return out


def _most_common(values) -> str:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v)) if counts else ""


def characters_table(chosen: list[Character]) -> pa.Table:
    """``characters.parquet``: one row per character, in rank order."""
    return pa.table({
        "rank": [c.rank for c in chosen], "character": [c.name for c in chosen],
        "samples": [c.samples for c in chosen], "people": [c.people for c in chosen],
        "series": [c.series for c in chosen], "prompt": [c.prompt for c in chosen],
        "key": np.array([c.key for c in chosen], dtype=np.uint64),
        "reference_ids": [[r.id for r in c.references] for c in chosen],
    }, schema=CHARACTERS_SCHEMA)


def read_reference(shards: Path, ref: Reference) -> bytes:
    """The stored bytes of a reference image."""
    path = shards / ref.shard
    try:
        with open(path, "rb") as f:
            f.seek(ref.offset)
            return f.read(ref.size)
    except OSError as e:
        raise HakubooruError(f"cannot read {path}: {e.strerror or e}") from None
