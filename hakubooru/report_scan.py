"""The dataset report's scan of the ``.json`` records, column by column (Arrow and NumPy).

A batch of records (some shards' worth) is read at the offsets the index gives (one positioned
read each), joined into newline-delimited JSON and parsed by ``pyarrow.json`` with a schema of
only the fields the report counts (``rating`` and the caption groups). Every count is then taken
over the batch's flattened tag lists at once: each tag becomes a code (its place in
:class:`TagTokens`), a count is an ``np.bincount`` of codes, and a caption's CLIP tokens are the
sum of its tags' tokens. Nothing runs in Python per record but for the few captions past the
token limit (which groups' tags they lose).

A batch that Arrow would not read exactly as ``json.loads`` does — a parse error, a line break
or bytes that are not UTF-8 in a record, a record that is no object with the caption groups —
is read again record by record with ``json.loads``: the first bad record is named in one line,
as before; records that only Arrow refuses (a number too big for a double, a repeated key) are
counted from their Python objects.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from .captioner import CAPTION_GROUPS
from .errors import HakubooruError
from .manifest import INDEX_FILE

SEPARATOR = ", "  # the trainer rebuilds captions from the record with this separator
SCHEMA = pa.schema([("rating", pa.string())] + [(g, pa.list_(pa.string())) for g in CAPTION_GROUPS])
BATCH_RECORDS = 50_000  # records parsed together: a few tens of MB
_PARSE = pa_json.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="ignore")
_BOM = "\ufeff".encode()  # json.loads refuses it at a record's start, Arrow skips it


@lru_cache(maxsize=1)
def _tokenizer():
    try:
        from .clip_tokenizer import sdxl_tokenizer
    except ImportError:
        raise HakubooruError("caption token lengths need transformers (the train extra): "
                             "pip install 'hakubooru[train]'") from None
    tok = sdxl_tokenizer(1).backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenize(tags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """CLIP tokens of each tag (in one batch): alone, and followed by the separator's comma. A
    tag ending in a letter or digit is followed by the comma as a pre-token of its own (one more
    token); one ending in punctuation may merge with it (``"),"``), so that form is tokenized too."""
    if not tags:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    tok = _tokenizer()
    alone = np.array([len(enc.ids) for enc in tok.encode_batch(tags, add_special_tokens=False)], dtype=np.int64)
    with_comma = alone + 1
    odd = [i for i, tag in enumerate(tags) if not tag[-1:].isalnum()]
    if odd:
        comma = SEPARATOR.strip()
        for i, enc in zip(odd, tok.encode_batch([tags[i] + comma for i in odd], add_special_tokens=False)):
            with_comma[i] = len(enc.ids)
    return alone, with_comma


class TagTokens:
    """CLIP token counts of tags, by code (a tag's place in ``names``): CLIP's pre-tokenizer
    splits at whitespace, so ``"a, b"`` tokenizes as ``"a,"`` then ``"b"`` and a caption's
    tokens are its tags' tokens (each with its separating comma, the last without), in order.

    ``stored``: the folder's stored tag counts' tags (codes below ``self.stored``), with their
    ``tokens`` (:func:`tokenize`'s) if tokenized already; the tags met later are tokenized when
    first seen and get the next codes."""

    def __init__(self, stored=(), tokens: tuple[np.ndarray, np.ndarray] | None = None):
        self.names: list[str] = list(dict.fromkeys(stored))
        self.index = {t: i for i, t in enumerate(self.names)}
        self.alone, self.with_comma = tokens if tokens is not None else tokenize(self.names)
        self._values = pa.array(self.names, pa.string())
        self._forms = np.zeros(0, dtype=np.int64)
        self.stored = len(self.names)

    def learn(self, tags) -> None:
        """Tokenize the tags not known yet and give them the next codes."""
        new = [t for t in dict.fromkeys(tags) if t not in self.index]
        if not new:
            return
        alone, with_comma = tokenize(new)
        self.index.update((t, i) for i, t in enumerate(new, start=len(self.names)))
        self.names += new
        self.alone = np.concatenate([self.alone, alone])
        self.with_comma = np.concatenate([self.with_comma, with_comma])
        self._values = pa.concat_arrays([self._values, pa.array(new, pa.string())])

    def codes(self, tags: pa.ChunkedArray) -> np.ndarray:
        """The code of each tag (the new ones tokenized first)."""
        found = pc.index_in(tags, value_set=self._values)
        if found.null_count:
            self.learn(pc.unique(tags.filter(found.is_null())).to_pylist())
            found = pc.index_in(tags, value_set=self._values)
        return found.to_numpy().astype(np.int64)

    def stored_forms(self, codes: np.ndarray) -> np.ndarray:
        """For each code, the code of its tag as the stored counts write it (stripped,
        lower-case) if that is a stored tag, else -1."""
        if len(self._forms) < len(self.names):
            self._forms = np.concatenate([self._forms, np.full(len(self.names) - len(self._forms), -2)])
        for code in np.unique(codes[self._forms[codes] == -2]).tolist():
            form = self.names[code].strip().lower()
            found = self.index.get(form, -1) if form else -1
            self._forms[code] = found if found < self.stored else -1
        return self._forms[codes]

    def ends(self, codes: np.ndarray) -> np.ndarray:
        """For each tag of a caption (its codes in order), the caption's tokens up to the end of
        its own text (its comma left out)."""
        with_comma = self.with_comma[codes]
        return np.cumsum(with_comma) - with_comma + self.alone[codes]


def _grown(counts: np.ndarray, n: int) -> np.ndarray:
    return np.pad(counts, (0, n - len(counts))) if len(counts) < n else counts


class RecordCounts:
    """Counts over records, by shard runs. Tags are counted by code (see :class:`TagTokens`):
    ``keep``, ``meta`` (every record), ``general`` (the runs whose general tags are counted:
    every run unless ``derive``) and, with ``derive``, ``counted``: by stored code, the tags the
    stored counts hold that are not general tags — every tag but the general ones of a run whose
    tags are all stored ones, and every tag (stripped, lower-case) of a run with another tag.
    The general tags are then the stored counts less ``counted``. ``tail``: the names of the
    codes past the stored tags', once the counts leave the process that made them."""

    def __init__(self, limit: int, derive: bool, stored: int):
        self.limit, self.derive, self.stored = limit, derive, stored
        self.tail: list[str] = []
        self._tail_index: dict[str, int] = {}
        self.rating, self.year, self.quality = Counter(), Counter(), Counter()
        empty = np.zeros(0, dtype=np.int64)
        self.keep = self.meta = self.general = self.counted = empty
        self.lengths = empty  # samples per caption length in tokens
        self.samples = self.cut_captions = self.cut_tokens = 0
        self.cut_tags = Counter()  # group -> tags whose text reaches past the limit

    def add_codes(self, name: str, codes: np.ndarray) -> None:
        """Count tag codes into the array ``name``."""
        found = np.bincount(codes)
        mine = _grown(getattr(self, name), len(found))
        mine[:len(found)] += found
        setattr(self, name, mine)

    def merge(self, other: "RecordCounts") -> None:
        """Add the counts of another process (its stored codes are these, its others by name)."""
        code = np.concatenate([np.arange(other.stored), [self._code(t) for t in other.tail]]).astype(np.int64)
        for name in ("keep", "meta", "general", "counted"):
            theirs = getattr(other, name)
            mine = _grown(getattr(self, name), self.stored + (len(self.tail) if name != "counted" else 0))
            mine[code[:len(theirs)]] += theirs  # codes are distinct: no np.add.at needed
            setattr(self, name, mine)
        for mine, theirs in ((self.rating, other.rating), (self.year, other.year),
                             (self.quality, other.quality), (self.cut_tags, other.cut_tags)):
            mine.update(theirs)
        n = max(len(self.lengths), len(other.lengths))
        self.lengths = _grown(self.lengths, n) + _grown(other.lengths, n)
        self.samples += other.samples
        self.cut_captions += other.cut_captions
        self.cut_tokens += other.cut_tokens

    def _code(self, tag: str) -> int:
        if tag not in self._tail_index:
            self._tail_index[tag] = self.stored + len(self.tail)
            self.tail.append(tag)
        return self._tail_index[tag]

    def named(self, name: str, names: list[str]) -> Counter:
        """The array ``name`` as a Counter of tag names (``names``: the stored tags), its
        counted tags only."""
        counts = getattr(self, name)
        found = np.flatnonzero(counts)
        every = names + self.tail if found.size and found[-1] >= len(names) else names
        return Counter(dict(zip(map(every.__getitem__, found.tolist()), counts[found].tolist())))


def _segment_sums(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments of ``values``, ``sizes`` long each."""
    running = np.concatenate(([0], np.cumsum(values, dtype=np.int64)))
    ends = np.cumsum(sizes)
    return running[ends] - running[ends - sizes]


def _value_counts(values: pa.Array) -> Counter:
    found = pc.value_counts(values)
    return Counter(dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist())))


class _Batch:
    """A parsed batch's caption groups as flat tag codes: ``sizes[g]`` (tags per record) and
    ``codes[g]`` (their codes, record after record)."""

    def __init__(self, table: pa.Table, tokens: TagTokens):
        self.table = table.combine_chunks()
        lists = [self.table.column(g).chunk(0) for g in CAPTION_GROUPS]
        self.sizes = {g: pc.list_value_length(a).to_numpy(zero_copy_only=False).astype(np.int64)
                      for g, a in zip(CAPTION_GROUPS, lists)}
        self.flat = {g: pc.list_flatten(a) for g, a in zip(CAPTION_GROUPS, lists)}
        codes = tokens.codes(pa.chunked_array(list(self.flat.values()), pa.string()))
        bounds = np.cumsum([len(f) for f in self.flat.values()])[:-1]
        self.codes = dict(zip(CAPTION_GROUPS, np.split(codes, bounds)))
        self.starts = {g: np.cumsum(sizes) - sizes for g, sizes in self.sizes.items()}

    def token_lengths(self, tokens: TagTokens) -> np.ndarray:
        """Each caption's tokens: its tags' with their commas, the last tag's without."""
        n = self.table.num_rows
        length, last = np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        for g in CAPTION_GROUPS:
            codes, sizes = self.codes[g], self.sizes[g]
            length += _segment_sums(tokens.with_comma[codes], sizes)
            has = sizes > 0
            last[has] = codes[np.cumsum(sizes)[has] - 1]
        has = last >= 0
        length[has] += tokens.alone[last[has]] - tokens.with_comma[last[has]]
        return length

    def unknown_runs(self, runs: np.ndarray, stored: int) -> np.ndarray:
        """For each record, whether its run (``runs``: each record's run) has a tag that is no
        stored one."""
        other = sum(_segment_sums(self.codes[g] >= stored, self.sizes[g]) for g in CAPTION_GROUPS)
        return (np.bincount(runs, weights=other) > 0)[runs]

    def tags_of(self, group: str, rows: np.ndarray) -> np.ndarray:
        """The codes of a group's tags in the records where ``rows`` is True."""
        return self.codes[group][np.repeat(rows, self.sizes[group])]

    def first_tags(self, group: str) -> Counter:
        """Records by the group's first tag, ``"none"`` for an empty group."""
        sizes = self.sizes[group]
        has = sizes > 0
        found = _value_counts(self.flat[group].take(pa.array(self.starts[group][has])))
        if not has.all():
            found["none"] += int((~has).sum())
        return found

    def caption(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """A record's caption: the group of each tag (its index in CAPTION_GROUPS) and the
        tags' codes, in caption order."""
        parts = [self.codes[g][self.starts[g][row]:self.starts[g][row] + self.sizes[g][row]]
                 for g in CAPTION_GROUPS]
        return np.repeat(np.arange(len(parts)), [len(p) for p in parts]), np.concatenate(parts)


def count_batch(counts: RecordCounts, table: pa.Table, runs: np.ndarray, tokens: TagTokens) -> None:
    """Add a batch's counts (``table``: its records' fields, a null rating for JSON null;
    ``runs``: each record's shard run)."""
    batch = _Batch(table, tokens)
    ratings = _value_counts(batch.table.column("rating").chunk(0).fill_null(""))
    if "" in ratings:
        ratings["unknown"] += ratings.pop("")
    counts.rating.update(ratings)
    counts.year.update(batch.first_tags("year"))
    counts.quality.update(batch.first_tags("quality"))
    counts.add_codes("keep", batch.codes["keep"])
    counts.add_codes("meta", batch.codes["meta"])
    dirty = batch.unknown_runs(runs, tokens.stored) if counts.derive else np.ones(len(runs), dtype=bool)
    counts.add_codes("general", batch.tags_of("general", dirty))
    if counts.derive:
        for g in CAPTION_GROUPS:
            if g != "general":
                counts.add_codes("counted", batch.tags_of(g, ~dirty))
            if dirty.any():
                forms = tokens.stored_forms(batch.tags_of(g, dirty))
                counts.add_codes("counted", forms[forms >= 0])
    lengths = batch.token_lengths(tokens)
    counts.samples += len(lengths)
    found = np.bincount(lengths)
    counts.lengths = _grown(counts.lengths, len(found))
    counts.lengths[:len(found)] += found
    for row in np.flatnonzero(lengths > counts.limit).tolist():
        groups, codes = batch.caption(row)
        counts.cut_captions += 1
        counts.cut_tokens += int(lengths[row]) - counts.limit
        # a tag is cut when its own text (not just its comma) reaches past the limit
        cut = np.bincount(groups[tokens.ends(codes) > counts.limit], minlength=len(CAPTION_GROUPS))
        counts.cut_tags.update({CAPTION_GROUPS[i]: int(n) for i, n in enumerate(cut.tolist()) if n})


def _read_runs(runs) -> tuple[list[bytes], int, HakubooruError | None]:
    """The records of the runs ``(path, offsets, sizes, ids)``, up to the first run whose
    shard is missing: (records, runs read, the error for that run or None)."""
    records = []
    for done, (path, offsets, sizes, _) in enumerate(runs):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return records, done, HakubooruError(f"{path} is named in {INDEX_FILE} but missing")
        try:
            records += map(os.pread, [fd] * len(sizes), sizes.tolist(), offsets.tolist())
        finally:
            os.close(fd)
    return records, len(runs), None


def _arrow_table(records: list[bytes], threads: bool) -> pa.Table | None:
    """The records' fields as Arrow parses them, or None where that might differ from what
    ``json.loads`` makes of them (then the records are read one by one)."""
    data = b"\n".join(records) + b"\n"
    if data.count(b"\n") != len(records) or b"\r" in data:
        return None  # a line break inside a record
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return None
        if _BOM in data:
            return None
    try:
        table = pa_json.read_json(pa.BufferReader(data), read_options=pa_json.ReadOptions(use_threads=threads),
                                  parse_options=_PARSE)
    except pa.ArrowInvalid:
        return None
    if table.num_rows != len(records) or any(
            table.column(g).null_count or pc.list_flatten(table.column(g)).null_count for g in CAPTION_GROUPS):
        return None
    for row in np.flatnonzero(table.column("rating").is_null().to_numpy(zero_copy_only=False)).tolist():
        if "rating" not in json.loads(records[row]):
            return None  # missing, not null
    return table


def _is_caption_record(rec) -> bool:
    """Whether a parsed record has a rating (text or null) and the caption groups (lists of text)."""
    return (isinstance(rec, dict) and isinstance(rec.get("rating", 0), (str, type(None)))
            and all(isinstance(rec.get(g), list) and all(isinstance(t, str) for t in rec[g]) for g in CAPTION_GROUPS))


def _lacks_groups(rec, path: str) -> HakubooruError:
    return HakubooruError(f"post {rec.get('id', '?') if isinstance(rec, dict) else '?'} in {path}: its .json "
                          f"record lacks the caption groups ({', '.join(CAPTION_GROUPS)})")


def _python_table(records: list[bytes], runs) -> pa.Table:
    """The records' fields from ``json.loads``, run by run; the first record that is not valid
    JSON, or no caption record, raises its one line."""
    parsed, start = [], 0
    for path, _, sizes, ids in runs:
        rows = []
        for data, post_id in zip(records[start:start + len(sizes)], ids.tolist()):
            try:
                rows.append(json.loads(data.decode()))
            except (ValueError, UnicodeDecodeError):
                raise HakubooruError(f"post {post_id} in {path}: its .json record is not valid JSON; "
                                     "rebuild the shard") from None
        for rec in rows:
            if not _is_caption_record(rec):
                raise _lacks_groups(rec, path)
        parsed += [{**{g: rec[g] for g in CAPTION_GROUPS}, "rating": rec["rating"] or "", "_where": (rec, path)}
                   for rec in rows]
        start += len(sizes)
    try:
        return pa.Table.from_pylist(parsed, schema=SCHEMA)
    except (pa.ArrowException, UnicodeError):  # text Arrow cannot hold, such as a lone surrogate
        for row in parsed:
            try:
                pa.Table.from_pylist([row], schema=SCHEMA)
            except (pa.ArrowException, UnicodeError):
                raise _lacks_groups(*row["_where"]) from None
        raise


_WORKER: dict = {}


def init_worker(stored: list[str], limit: int, derive: bool, threads: bool = False) -> None:
    """Set up a process to scan records: ``stored``, the folder's stored tags (tokenized by
    :func:`tokenize`, the counts given with the first runs to scan); ``threads``: Arrow may
    parse on several threads."""
    _WORKER.update(stored=stored, tokens=None, limit=limit, derive=derive, threads=threads)


def scan(task) -> RecordCounts:
    """The counts of some shard runs ``(path, offsets, sizes, ids)``, given with the stored
    tags' token counts as ``(runs, tokens)`` (in a worker process set up by
    :func:`init_worker`, or in this one)."""
    runs, stored_tokens = task
    if _WORKER["tokens"] is None:
        _WORKER["tokens"] = TagTokens(_WORKER["stored"], stored_tokens)
    tokens = _WORKER["tokens"]
    counts = RecordCounts(_WORKER["limit"], _WORKER["derive"], tokens.stored)
    for batch in _batches(runs):
        records, done, missing = _read_runs(batch)
        if done:
            table = _arrow_table(records, _WORKER["threads"]) or _python_table(records, batch[:done])
            count_batch(counts, table, np.repeat(np.arange(done), [len(run[2]) for run in batch[:done]]), tokens)
        if missing is not None:
            raise missing
    counts.tail = tokens.names[tokens.stored:]
    return counts


def _batches(runs):
    """Consecutive runs of about BATCH_RECORDS records together."""
    batch, size = [], 0
    for run in runs:
        batch.append(run)
        size += len(run[2])
        if size >= BATCH_RECORDS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
