"""The index of a shard folder as NumPy columns: ``index.parquet`` read once, after the folder is
checked against its manifest. Start-up reads this, never the records."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hakubooru.errors import HakubooruError
from hakubooru.shardfolder import shard_folder
from trainers.lokr.data.integrity import REBUILD, check_shard_folder

INDEX_COLUMNS = ("id", "shard", "image_offset", "image_size", "json_offset", "json_size",
                 "width", "height")
TEXT_COLUMNS = ("txt_offset", "txt_size")  # -1 = no such member (webdataset folders from other tools)
HASH_COLUMNS = ("image_xxh3", "txt_xxh3", "json_xxh3")  # build-time member hashes (hakubooru.manifest)
COLUMN_DTYPES = {"width": np.int32, "height": np.int32, **{c: np.uint64 for c in HASH_COLUMNS}}


@dataclass
class ShardIndex:
    """The rows of ``index.parquet`` as NumPy columns (row i = sample i, sorted by id)."""

    ids: np.ndarray           # int64
    shard: np.ndarray         # int32 code into shard_names
    shard_names: list[str]
    image_offset: np.ndarray  # int64
    image_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    width: np.ndarray         # int32, stored image
    height: np.ndarray
    fingerprint: str          # identifies the dataset (the manifest's)
    txt_offset: np.ndarray | None = None  # int64; -1 (or None: not indexed) = no .txt
    txt_size: np.ndarray | None = None
    image_hash: np.ndarray | None = None  # uint64 member_hash of each member (None: not checked)
    txt_hash: np.ndarray | None = None
    json_hash: np.ndarray | None = None
    ext: np.ndarray | None = None         # int32 code into ext_names (the image member's extension)
    ext_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def load_index(shards_dir) -> ShardIndex:
    """Read ``index.parquet`` of a finished shard folder, after checking the folder against its
    ``manifest.json`` (trainers.lokr.data.integrity). Raises HakubooruError when the folder, the
    manifest, the index, a column or a shard is missing, a shard's size is not the manifest's,
    or the index is empty or not sorted by unique id."""
    root = shard_folder(shards_dir)
    path = root / "index.parquet"
    try:
        meta = pq.read_metadata(path)
        names_in_file = set(meta.schema.to_arrow_schema().names)
        if not set(HASH_COLUMNS) <= names_in_file:
            raise HakubooruError(f"{path} has no member hashes (written by an older hakubooru); "
                                 f"{REBUILD} to rebuild the shards and the index")
        missing = [c for c in (*INDEX_COLUMNS, "ext") if c not in names_in_file]
        if missing:
            raise HakubooruError(f"cannot read {path}: no column {', '.join(missing)}; {REBUILD} to rebuild the "
                                 "shards and the index")
        if meta.num_rows == 0:
            raise HakubooruError(f"{path} has no samples")
        shard, ext = (_codes(path, c) for c in ("shard", "ext"))
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    names = [str(s) for s in shard[1]]
    fingerprint = check_shard_folder(root, names, meta.num_rows)
    text = [c for c in TEXT_COLUMNS if c in names_in_file]
    try:
        col = {c: _column(path, c) for c in (*INDEX_COLUMNS, *text, *HASH_COLUMNS) if c != "shard"}
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if np.any(col["id"][1:] <= col["id"][:-1]):
        raise HakubooruError(f"{path} is not sorted by unique id")
    return ShardIndex(
        ids=col["id"], shard=shard[0], shard_names=names,
        **{c: col[c] for c in ("image_offset", "image_size", "json_offset", "json_size", "width", "height", *text)},
        fingerprint=fingerprint, image_hash=col["image_xxh3"], txt_hash=col["txt_xxh3"], json_hash=col["json_xxh3"],
        ext=ext[0], ext_names=[str(e) for e in ext[1]])


def _column(file, name: str) -> np.ndarray:
    """One column as NumPy, in its dtype (ShardIndex's), read alone so that no more than one
    column is ever held twice (Arrow's and NumPy's)."""
    want = COLUMN_DTYPES.get(name, np.int64)
    return pq.read_table(file, columns=[name]).column(0).to_numpy().astype(want, copy=False)


def _codes(file, name: str) -> tuple[np.ndarray, list]:
    """A string column as int32 codes and the distinct values they index."""
    column = pq.read_table(file, columns=[name], read_dictionary=[name]).column(0).combine_chunks()
    return column.indices.to_numpy().astype(np.int32, copy=False), column.dictionary.to_pylist()
