"""SDXL text conditioning (recipe §4): two CLIP encoders, up to three 75-token windows."""
from __future__ import annotations

import torch

WINDOW = 75  # caption tokens per window; each window is BOS + 75 + EOS = 77 positions


def window_ids(tokenizer, captions: list[str], max_windows: int) -> torch.Tensor:
    """Token ids (B, max_windows, 77): each caption's first 75·max_windows tokens cut into
    75-token windows, each wrapped as BOS, tokens, EOS, then padded with the tokenizer's pad.

    Every caption gets all `max_windows` windows (empty ones are BOS EOS pad…), so the
    context length never depends on which captions share a batch.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = tokenizer(list(captions), add_special_tokens=False, truncation=True,
                       max_length=WINDOW * max_windows).input_ids
    out = torch.full((len(captions), max_windows, WINDOW + 2), pad, dtype=torch.long)
    for b, ids in enumerate(tokens):
        for w in range(max_windows):
            chunk = ids[w * WINDOW:(w + 1) * WINDOW]
            out[b, w, : len(chunk) + 2] = torch.tensor([bos, *chunk, eos])
    return out


def encode_prompts(sdxl, captions: list[str], *, max_windows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning for a batch of captions.

    Returns `context` (B, 77·max_windows, C1 + C2): the penultimate hidden states of both
    text encoders, concatenated on channels, windows concatenated along the sequence; and
    `pooled` (B, P): text encoder 2's projection at the first EOS of the first window.
    Tokens past 75·max_windows (225 by default) are dropped.
    """
    if max_windows < 1:
        raise ValueError("max_windows must be at least 1")
    n = len(captions)
    states, pooled = [], None
    for tokenizer, encoder in ((sdxl.tokenizer_1, sdxl.text_encoder_1), (sdxl.tokenizer_2, sdxl.text_encoder_2)):
        device = next(encoder.parameters()).device
        ids = window_ids(tokenizer, captions, max_windows).to(device)
        out = encoder(ids.view(n * max_windows, WINDOW + 2), output_hidden_states=True)
        states.append(out.hidden_states[-2].reshape(n, max_windows * (WINDOW + 2), -1))
        if encoder is sdxl.text_encoder_2:
            pooled = out.text_embeds.view(n, max_windows, -1)[:, 0]
    return torch.cat(states, dim=-1), pooled
