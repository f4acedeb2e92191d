"""``data.caption_dropout``: a sample's whole caption replaced by the empty prompt, so the model
also learns the unconditional prediction classifier-free guidance needs (as sd-scripts'
``--caption_dropout_rate``, OneTrainer and SimpleTuner do). The draw is ``uniform(seed, micro
step, sample id, stream)``: the same on any rank, worker or resume, independent of the batch."""
from __future__ import annotations

from hakubooru.rng import uniform

CAPTION_DROPOUT_STREAM = 0xDC0  # separates this draw from the sample's other randomness


def drop_captions(captions: list[str], ids, *, seed: int, micro_step: int, rate: float) -> list[str]:
    """``captions`` with each replaced by ``""`` where its draw falls below ``rate``."""
    if rate <= 0:
        return list(captions)
    return ["" if uniform(seed, micro_step, int(i), CAPTION_DROPOUT_STREAM) < rate else c
            for c, i in zip(captions, ids.tolist())]
