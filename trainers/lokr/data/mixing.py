"""Several shard folders in one run (``--shards A --shards B:3``): their indexes laid end to end as
one ``ShardIndex`` (shard files by absolute path), and per epoch how many times each sample is
planned: a folder of weight w gives each of its samples ⌊w⌋ copies, plus one more to the
round((w − ⌊w⌋)·n) samples with the smallest ``hash64(seed, epoch, stream, folder, id)`` — so the
epoch draws from the folders in proportion to weight × size, deterministically, and a weight
below 1 takes another subset each epoch. One folder of weight 1 is the recipe's index itself.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hakubooru.errors import HakubooruError
from hakubooru.rng import hash64, hash64_array
from trainers.lokr.data.index import ShardIndex, load_index

MIX_STREAM = 0x313C


@dataclass(frozen=True)
class Source:
    """One ``--shards`` value: a shard folder and its weight."""

    path: Path
    weight: float = 1.0


def parse_sources(values) -> list[Source]:
    """``["out/", "curated/:3"]`` → Sources; a single path (str or Path) is one source of weight 1."""
    if isinstance(values, (str, Path)):
        values = [values]
    out = []
    for value in values:
        text = str(value)
        path, sep, tail = text.rpartition(":")
        weight = 1.0
        if sep and path:
            try:
                weight = float(tail)
            except ValueError:
                path = text
        else:
            path = text
        if not (math.isfinite(weight) and weight > 0):
            raise HakubooruError(f"--shards {text}: the weight after ':' must be a number > 0 (PATH or PATH:WEIGHT)")
        out.append(Source(Path(path), weight))
    if len({s.path.resolve() for s in out}) != len(out):
        raise HakubooruError("--shards names the same folder twice; give it once with a weight (PATH:WEIGHT)")
    return out


@dataclass
class Mixture:
    """The sources of a run, their combined index, and each index row's source."""

    sources: list[Source]
    index: ShardIndex
    source_of: np.ndarray       # int16 per index row
    fingerprints: list[str]     # each folder's own

    @property
    def mixed(self) -> bool:
        return len(self.sources) > 1 or self.sources[0].weight != 1.0

    def counts(self, seed: int, epoch: int) -> np.ndarray | None:
        """Copies of each index row in ``epoch``'s plan (None: one each, the recipe)."""
        if not self.mixed:
            return None
        counts = np.zeros(len(self.index), dtype=np.int64)
        for k, src in enumerate(self.sources):
            rows = np.flatnonzero(self.source_of == k)
            whole = math.floor(src.weight)
            counts[rows] = whole
            extra = round((src.weight - whole) * len(rows))
            if extra:
                keys = hash64_array(hash64(seed, epoch, MIX_STREAM, k), self.index.ids[rows])
                counts[rows[np.argsort(keys, kind="stable")[:extra]]] += 1
        return counts

    def names(self) -> list[str]:
        return [s.path.resolve().name for s in self.sources]


def load_mixture(values) -> Mixture:
    """Load every source's index (each checked as ``load_index`` checks one) and combine them."""
    sources = parse_sources(values)
    indexes = [load_index(s.path) for s in sources]
    fingerprints = [i.fingerprint for i in indexes]
    if len(sources) == 1:
        index = indexes[0]
        if sources[0].weight != 1.0:
            index = replace(index, fingerprint=_fingerprint(sources, fingerprints))
        return Mixture(sources, index, np.zeros(len(index), dtype=np.int16), fingerprints)
    return Mixture(sources, _combine(sources, indexes, fingerprints),
                   np.concatenate([np.full(len(i), k, dtype=np.int16) for k, i in enumerate(indexes)]), fingerprints)


def _fingerprint(sources, fingerprints) -> str:
    text = json.dumps([[fp, s.weight] for s, fp in zip(sources, fingerprints)])
    return "mix:" + hashlib.sha256(text.encode()).hexdigest()


def _combine(sources, indexes: list[ShardIndex], fingerprints) -> ShardIndex:
    shard_names, shard, ext_names, ext = [], [], [], []
    for src, idx in zip(sources, indexes):
        root = src.path.resolve()
        shard.append(idx.shard + len(shard_names))
        shard_names += [str(root / name) for name in idx.shard_names]  # absolute: read from any root
        names = list(idx.ext_names or [])
        codes = np.array([ext_names.index(n) if n in ext_names else -1 for n in names], dtype=np.int32)
        for j, n in enumerate(names):
            if codes[j] < 0:
                codes[j] = len(ext_names)
                ext_names.append(n)
        ext.append(codes[idx.ext] if len(names) else np.zeros(len(idx), np.int32))

    def cat(name):
        parts = [getattr(i, name) for i in indexes]
        if any(p is None for p in parts):
            if name in ("txt_offset", "txt_size"):
                return np.concatenate([p if p is not None else np.full(len(i), -1, np.int64)
                                       for p, i in zip(parts, indexes)])
            return None
        return np.concatenate(parts)

    cols = ("ids", "image_offset", "image_size", "json_offset", "json_size", "width", "height", "txt_offset",
            "txt_size", "image_hash", "txt_hash", "json_hash")
    return ShardIndex(shard=np.concatenate(shard).astype(np.int32), shard_names=shard_names,
                      fingerprint=_fingerprint(sources, fingerprints), ext=np.concatenate(ext).astype(np.int32),
                      ext_names=ext_names, **{c: cat(c) for c in cols})
