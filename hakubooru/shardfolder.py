"""Opening a shard folder given on the command line: the folder, not one of its shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import HakubooruError

INDEX_FILE = "index.parquet"


def shard_folder(path, need_index: bool = True) -> Path:
    """``path`` as a shard folder; one clear error for a shard file, a missing folder, or
    (with ``need_index``) a folder without ``index.parquet``."""
    root = Path(path)
    if root.is_file():
        if root.name.endswith(".tar"):
            raise HakubooruError(f"{root} is one shard; pass the folder that holds the shards "
                                 f"and index.parquet ({root.parent})")
        raise HakubooruError(f"{root} is a file; pass a shard folder")
    if not root.is_dir():
        raise HakubooruError(f"shard folder {root} does not exist")
    if need_index and not (root / INDEX_FILE).is_file():
        raise HakubooruError(
            f"{root} has no index.parquet: build it with `python -m hakubooru build`, or index a "
            f"webdataset folder with `python -m hakubooru index {root}`")
    return root


def read_index(root: Path, columns=None, optional=()) -> pa.Table:
    """``index.parquet`` of a shard folder (only ``columns`` if given, and those of ``optional``
    the file has); one error line if unreadable."""
    path = Path(root) / INDEX_FILE
    try:
        if optional:
            columns = [*columns, *(c for c in optional if c in pq.read_schema(path).names)]
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def shard_runs(codes: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Index rows grouped by shard (``codes``: each row's shard number), each group in file
    order (by ``offsets``), so a reader goes through every shard front to back once."""
    order = np.lexsort((offsets, codes))
    bounds = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1], True])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
