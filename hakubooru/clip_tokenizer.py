"""SDXL's two CLIP tokenizers, built offline from the bundled CLIP BPE vocabulary.

SDXL's `tokenizer/` and `tokenizer_2/` folders hold the same `vocab.json` and `merges.txt`
(OpenAI CLIP's 49,408-token BPE); they differ only in the padding token (`<|endoftext|>` for
text encoder 1, `!` for text encoder 2). Both are made here from
`vocab/bpe_simple_vocab_16e6.txt.gz` the way CLIP's own `SimpleTokenizer` reads it, so
nothing is fetched and no tokenizer folder is needed. Needs `transformers` (the `train` extra).
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD = {1: EOS, 2: "!"}


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's tokenizer: 256 byte symbols, their end-of-word forms, one
    token per merge, then BOS and EOS (ids 49406 and 49407); merges as "a b" lines."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def sdxl_tokenizer(which: int):
    """SDXL's tokenizer for text encoder `which` (1 or 2) as a transformers `CLIPTokenizer`."""
    from transformers import CLIPTokenizer

    if which not in PAD:
        raise ValueError(f"SDXL has text encoders 1 and 2, not {which!r}")
    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], unk_token=EOS,
                         bos_token=BOS, eos_token=EOS, pad_token=PAD[which], model_max_length=77)


def sdxl_tokenizers():
    """(tokenizer 1, tokenizer 2) of SDXL, offline."""
    return sdxl_tokenizer(1), sdxl_tokenizer(2)


def write_tokenizer_folder(folder: str | os.PathLike, which: int) -> Path:
    """Write `vocab.json`, `merges.txt` and the tokenizer configs of SDXL's `tokenizer/`
    (which=1) or `tokenizer_2/` (which=2) into `folder`, loadable by `CLIPTokenizer.from_pretrained`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD[which]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "add_prefix_space": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
