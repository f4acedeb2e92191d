"""hakubooru: the danbooru2023 metadata database and image archives -> captioned webdataset shards.

    from hakubooru import Selector, Captioner, open_db, build_shards
"""
from importlib import import_module

from .db import LocalPost, Post, PostTagRelation, Tag, fingerprint, open_db
from .errors import HakubooruError
from .selector import Selection, Selector, load_selection

__version__ = "0.1.0"

# Heavier pieces load on first use, so `import hakubooru` stays fast.
_LAZY = {
    "Captioner": "hakubooru.captioner",
    "QualityThresholds": "hakubooru.quality",
    "build_shards": "hakubooru.builder",
    "export_kohya": "hakubooru.export",
    "index_webdataset": "hakubooru.wdsindex",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hakubooru' has no attribute {name!r}")


__all__ = ["Selector", "Selection", "load_selection", "open_db", "fingerprint", "HakubooruError",
           "Post", "Tag", "PostTagRelation", "LocalPost", *_LAZY]
