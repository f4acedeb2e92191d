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
        names_in_file = set(pq.read_schema(path).names)
        if not set(HASH_COLUMNS) <= names_in_file:
            raise HakubooruError(f"{path} has no member hashes (written by an older hakubooru); "
                                 f"{REBUILD} to rebuild the shards and the index")
        text = [c for c in TEXT_COLUMNS if c in names_in_file]
        table = pq.read_table(path, columns=[*INDEX_COLUMNS, *text, *HASH_COLUMNS, "ext"],
                              read_dictionary=["shard", "ext"])
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise HakubooruError(f"{path} has no samples")
    shard = table.column("shard").combine_chunks()
    names = [str(s) for s in shard.dictionary.to_pylist()]
    fingerprint = check_shard_folder(root, names, table.num_rows)
    col = {c: table.column(c).to_numpy() for c in (*INDEX_COLUMNS, *text, *HASH_COLUMNS) if c != "shard"}
    if np.any(np.diff(col["id"]) <= 0):
        raise HakubooruError(f"{path} is not sorted by unique id")
    ext = table.column("ext").combine_chunks()
    return ShardIndex(
        ids=col["id"].astype(np.int64), shard=shard.indices.to_numpy().astype(np.int32),
        shard_names=names,
        **{c: col[c].astype(np.int64) for c in ("image_offset", "image_size", "json_offset",
                                                "json_size")},
        width=col["width"].astype(np.int32), height=col["height"].astype(np.int32),
        fingerprint=fingerprint, image_hash=col["image_xxh3"].astype(np.uint64),
        txt_hash=col["txt_xxh3"].astype(np.uint64), json_hash=col["json_xxh3"].astype(np.uint64),
        ext=ext.indices.to_numpy().astype(np.int32), ext_names=[str(e) for e in ext.dictionary.to_pylist()],
        **{c: col[c].astype(np.int64) for c in text})
