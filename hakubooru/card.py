"""The dataset card (``README.md``) of a shard folder: what the Hugging Face Hub and
``datasets.load_dataset("out/")`` read.

Its YAML front matter names the shards as the only data files (``configs``), so the
loader takes the webdataset builder and never looks at ``index.parquet`` or
``skipped.parquet``, and gives the column types (``dataset_info.features``, from
``hf_features``), so no type is guessed from the first samples. The body states where the
data came from (database fingerprint, selection, seed, captioner, counts) and the licence
note for danbooru images. The card is a pure function of the manifest: same bytes on a
re-run.
"""
from __future__ import annotations

import json

CARD_FILE = "README.md"
SHARD_PATTERN = "shard-*.tar"

LICENCE_NOTE = (
    "The images are artworks posted to Danbooru (https://danbooru.donmai.us) and remain "
    "the property of their artists; Danbooru does not license them, and neither does "
    "hakubooru. The tags and metadata come from the danbooru2023 database. Check the "
    "terms of the image archives you built from and the rights of the artists before "
    "publishing or training on this dataset; remove a work on its author's request.")


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` samples."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
                        (100_000_000, "10M<n<100M")):
        if n < bound:
            return name
    return "100M<n<1B"


def front_matter(image_ext: str, samples: int) -> dict:
    """The card's YAML metadata: configs (the shards, one ``train`` split) and features."""
    from .hf import hf_features

    return {
        "pretty_name": "hakubooru shards",
        "size_categories": [size_category(samples)],
        "license": "other",
        "license_name": "danbooru-artworks",
        "task_categories": ["text-to-image"],
        "tags": ["danbooru", "webdataset", "hakubooru"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": SHARD_PATTERN}]}],
        "dataset_info": {"config_name": "default",
                         "features": hf_features(image_ext)._to_yaml_list()},
    }


def dataset_card(manifest: dict, image_ext: str) -> bytes:
    """The README.md bytes for the shard folder described by ``manifest``."""
    import yaml

    counts, sel = manifest["counts"], manifest["selection"]
    skipped = ", ".join(f"{r} {n}" for r, n in sorted(counts["skipped_by_reason"].items()))
    cap = manifest["captioner"]
    lines = [
        "---",
        yaml.safe_dump(front_matter(image_ext, counts["written"]), sort_keys=False, allow_unicode=True,
                       width=1000).rstrip("\n"),
        "---",
        "",
        f"# hakubooru shards: {counts['written']:,} captioned images",
        "",
        f"{manifest['shard_count']} webdataset shards (`{SHARD_PATTERN}`), each sample "
        f"`<id>.{image_ext}` (the image), `<id>.txt` (the caption) and `<id>.json` (the "
        "structured caption record), built by "
        "hakubooru from the danbooru2023 database and image archives.",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("path/to/this/folder", split="train")'
        "        # or streaming=True",
        "```",
        "",
        "`index.parquet` (one row per sample: shard and byte offsets of its members) and "
        "`skipped.parquet` (selected posts not written, with the reason) sit beside the shards; "
        "`manifest.json` holds every shard's size and xxh3-128 checksum.",
        "",
        "## Provenance",
        "",
        f"- dataset fingerprint: `{manifest.get('fingerprint', '')}`",
        f"- database fingerprint: `{manifest['db_fingerprint']}`",
        f"- selection: `{json.dumps(sel['expression'], sort_keys=True)}`",
        f"- selection seeds: {json.dumps(sel['seeds'])}; ids sha256 `{sel['sha256']}`",
        f"- posts selected {counts['selected']:,}, written {counts['written']:,}, "
        f"skipped {counts['skipped']:,}" + (f" ({skipped})" if skipped else ""),
        f"- captioner: `{cap.get('captioner')}`, settings "
        f"`{json.dumps({k: v for k, v in cap.items() if k != 'quality'}, sort_keys=True, ensure_ascii=False)}`",
        f"- images: `{json.dumps(manifest['image_policy'], sort_keys=True)}`",
        f"- shard size {manifest['shard_size']}, shards {manifest['shard_count']}",
        "",
        "## Licence",
        "",
        LICENCE_NOTE,
        "",
    ]
    return "\n".join(lines).encode()
