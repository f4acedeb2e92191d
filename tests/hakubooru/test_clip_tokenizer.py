"""SDXL's tokenizers, built offline from the bundled CLIP vocabulary (hand-checked ids)."""
from transformers import CLIPTokenizer

from hakubooru.clip_tokenizer import clip_vocab, sdxl_tokenizer, sdxl_tokenizers, write_tokenizer_folder


def test_a_photo_of_a_cat_as_sdxl_tokenizes_it():
    # The ids SDXL's tokenizer/ and tokenizer_2/ give (checked by hand against the published files).
    for tok in sdxl_tokenizers():
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_size_special_ids_and_padding():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320  # byte symbols first, then end-of-word forms
    tok1, tok2 = sdxl_tokenizers()
    assert tok1.pad_token == "<|endoftext|>" and tok1.pad_token_id == 49407
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert tok1.model_max_length == tok2.model_max_length == 77


def test_lower_cases_like_clip():
    tok = sdxl_tokenizer(1)
    assert tok("A Photo Of A Cat").input_ids == tok("a photo of a cat").input_ids


def test_written_folder_loads_with_transformers(tmp_path):
    for which, sub in ((1, "tokenizer"), (2, "tokenizer_2")):
        write_tokenizer_folder(tmp_path / sub, which)
        tok = CLIPTokenizer.from_pretrained(tmp_path, subfolder=sub, local_files_only=True)
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tok.pad_token_id == (49407 if which == 1 else 0)
    assert (tmp_path / "tokenizer" / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"


def test_unknown_encoder_refused():
    import pytest
    with pytest.raises(ValueError):
        sdxl_tokenizer(3)


def test_written_special_tokens_and_config_files(tmp_path):
    """tokenizer_2/'s special tokens (pad "!", the rest <|startoftext|> / <|endoftext|>) and the
    CLIPTokenizer config, written as 2-space-indented JSON like transformers' save_pretrained."""
    folder = write_tokenizer_folder(tmp_path / "tokenizer_2", 2)
    assert (folder / "special_tokens_map.json").read_text() == (
        '{\n'
        '  "bos_token": "<|startoftext|>",\n'
        '  "eos_token": "<|endoftext|>",\n'
        '  "unk_token": "<|endoftext|>",\n'
        '  "pad_token": "!"\n'
        '}\n')
    assert (folder / "tokenizer_config.json").read_text() == (
        '{\n'
        '  "tokenizer_class": "CLIPTokenizer",\n'
        '  "do_lower_case": true,\n'
        '  "errors": "replace",\n'
        '  "model_max_length": 77,\n'
        '  "add_prefix_space": false,\n'
        '  "bos_token": "<|startoftext|>",\n'
        '  "eos_token": "<|endoftext|>",\n'
        '  "unk_token": "<|endoftext|>",\n'
        '  "pad_token": "!"\n'
        '}\n')
