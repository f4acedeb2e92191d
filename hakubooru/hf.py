"""The Hugging Face ``datasets`` schema of a shard folder's samples.

``datasets.load_dataset("webdataset", ...)`` infers column types from the first 5 samples
of the first shard; a tag group empty in all of them (``meta: []``) is typed ``null`` and
the first non-empty one then fails to cast. Passing ``features=hf_features(ext)`` avoids
the guess; a build's dataset card (hakubooru.card) records the same features, so
``load_dataset("out/")`` needs no argument.
"""
from __future__ import annotations

from .captioner import CAPTION_GROUPS
from .errors import HakubooruError
from .images import IMAGE_EXTS

RECORD_INTS = ("id", "width", "height", "score", "fav_count")
RECORD_STRINGS = ("rating", "created_at")


def hf_features(image_ext: str = "webp"):
    """The ``datasets.Features`` of one sample: ``__key__``, ``__url__``, ``json`` (the
    caption record as a struct, tag groups as lists of strings), ``txt`` and the image
    column named by the shards' image extension (the ``ext`` column of index.parquet)."""
    stored = sorted(set(IMAGE_EXTS.values()))
    if image_ext not in stored:
        raise HakubooruError(f"unknown image extension {image_ext!r}; choose one of "
                             f"{', '.join(stored)}")
    import datasets  # slow to import: only when asked for

    string = datasets.Value("string")
    record = {name: datasets.Value("int64") for name in RECORD_INTS}
    record.update({name: string for name in RECORD_STRINGS})
    record.update({group: datasets.List(string) for group in CAPTION_GROUPS})
    return datasets.Features({"__key__": string, "__url__": string, "json": record,
                              "txt": string, image_ext: datasets.Image()})
