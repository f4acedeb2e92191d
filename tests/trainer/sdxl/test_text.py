"""SDXL text conditioning on the tiny model: window layout, shapes, truncation, pooling."""
import pytest
import torch

from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.sdxl.text import encode_prompts, window_ids

# The tiny tokenizers have no merges: one token per character, the word's last character in
# its "</w>" form. Vocabulary order (models.tiny_tokenizers): the 256 byte symbols of
# bytes_to_unicode, which starts with "!".."~" (bytes 33..126), then their "</w>" forms at
# +256, then BOS = 512 and EOS = 513. Tokenizer 1 pads with EOS, tokenizer 2 with "!" = 0.
A, B_END = ord("a") - 33, 256 + ord("b") - 33  # "a" = 64, "b</w>" = 321
BOS, EOS = 512, 513


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(seed=0)


def word_caption(n_tokens: int) -> str:
    """A caption of exactly n_tokens tokens: words "ab" (2 tokens each) joined by spaces."""
    assert n_tokens % 2 == 0
    return " ".join(["ab"] * (n_tokens // 2))


def test_window_ids_by_hand(sdxl):
    ids1 = window_ids(sdxl.tokenizer_1, ["ab"], 2)
    ids2 = window_ids(sdxl.tokenizer_2, ["ab"], 2)
    assert ids1.shape == ids2.shape == (1, 2, 77)
    # window 0: BOS a b</w> EOS, then padding; window 1 (no tokens left): BOS EOS, padding
    assert ids1[0, 0, :4].tolist() == [BOS, A, B_END, EOS]
    assert ids1[0, 0, 4:].tolist() == [EOS] * 73
    assert ids1[0, 1, :2].tolist() == [BOS, EOS] and ids1[0, 1, 2:].tolist() == [EOS] * 75
    assert ids2[0, 0, :4].tolist() == [BOS, A, B_END, EOS]
    assert ids2[0, 0, 4:].tolist() == [0] * 73
    assert ids2[0, 1, :2].tolist() == [BOS, EOS] and ids2[0, 1, 2:].tolist() == [0] * 75


def test_window_split_at_75_tokens(sdxl):
    # 152 tokens: window 0 holds tokens 0..74, window 1 tokens 75..149, window 2 tokens 150..151.
    ids = window_ids(sdxl.tokenizer_1, [word_caption(152)], 3)[0]
    tokens = [A, B_END] * 76
    assert ids[0].tolist() == [BOS, *tokens[0:75], EOS]
    assert ids[1].tolist() == [BOS, *tokens[75:150], EOS]
    assert ids[2, :4].tolist() == [BOS, *tokens[150:152], EOS]


@pytest.mark.parametrize("windows", [1, 2, 3])
def test_shapes(sdxl, windows):
    context, pooled = encode_prompts(sdxl, ["1girl, solo", word_caption(200)], max_windows=windows)
    # 77 positions per window; channels 32 (text encoder 1) + 64 (text encoder 2)
    assert context.shape == (2, 77 * windows, 96)
    assert pooled.shape == (2, 64)  # text encoder 2's projection_dim


def test_context_is_penultimate_states_of_separately_encoded_windows(sdxl):
    caption = word_caption(100)
    context, _ = encode_prompts(sdxl, [caption], max_windows=2)
    with torch.no_grad():
        for w in range(2):
            ids1 = window_ids(sdxl.tokenizer_1, [caption], 2)[:, w]
            ids2 = window_ids(sdxl.tokenizer_2, [caption], 2)[:, w]
            h1 = sdxl.text_encoder_1(ids1, output_hidden_states=True).hidden_states[-2]
            h2 = sdxl.text_encoder_2(ids2, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(context[:, 77 * w:77 * (w + 1), :32], h1, rtol=0, atol=1e-6)
            torch.testing.assert_close(context[:, 77 * w:77 * (w + 1), 32:], h2, rtol=0, atol=1e-6)


def test_truncated_at_225_tokens(sdxl):
    base = word_caption(224) + " a"          # 225 tokens: ..., "a</w>"
    longer = word_caption(224) + " ab ab"    # 228 tokens: token 225 is "a" (not "a</w>")
    c1, p1 = encode_prompts(sdxl, [base], max_windows=3)
    c2, p2 = encode_prompts(sdxl, [longer], max_windows=3)
    assert not torch.equal(window_ids(sdxl.tokenizer_1, [base], 3), window_ids(sdxl.tokenizer_1, [longer], 3))
    # they differ only in token 224 ("a</w>" vs "a"): window 2, position 1 + 74 = 75
    ids_b, ids_l = window_ids(sdxl.tokenizer_1, [base], 3), window_ids(sdxl.tokenizer_1, [longer], 3)
    assert (ids_b != ids_l).nonzero().tolist() == [[0, 2, 75]]
    # windows 0 and 1 are the same, so are their states and the pooled vector
    torch.testing.assert_close(c1[:, :154], c2[:, :154], rtol=0, atol=0)
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    # tokens 226 and on never reach the encoders: 80 more tokens change nothing
    more = longer + " ab" * 40
    assert torch.equal(window_ids(sdxl.tokenizer_1, [more], 3), ids_l)
    c3, _ = encode_prompts(sdxl, [more], max_windows=3)
    torch.testing.assert_close(c3, c2, rtol=0, atol=0)


def test_pooled_from_first_window_first_eos(sdxl):
    # Captions equal in window 0, different later: equal pooled vectors.
    a, b = word_caption(80), word_caption(80) + " zz zz"
    _, pa = encode_prompts(sdxl, [a], max_windows=3)
    _, pb = encode_prompts(sdxl, [b], max_windows=3)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # and it is text encoder 2's projection of its final (normed) state at the first EOS of window 0
    caption = "1girl, solo"  # 11 tokens: "1girl," -> 1 g i r l ,</w> ... ; first EOS at 1 + n_tokens
    n_tokens = len(sdxl.tokenizer_2(caption, add_special_tokens=False).input_ids)
    ids = window_ids(sdxl.tokenizer_2, [caption], 1)[:, 0]
    assert ids[0, 1 + n_tokens].item() == EOS
    with torch.no_grad():
        last = sdxl.text_encoder_2(ids).last_hidden_state  # after the final layer norm
        expected = sdxl.text_encoder_2.text_projection(last[:, 1 + n_tokens])
    _, pooled = encode_prompts(sdxl, [caption], max_windows=3)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
