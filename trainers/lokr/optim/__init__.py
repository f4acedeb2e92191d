"""How gradients become weights: the optimizer (`optimizers`), the learning-rate schedule
(`schedule`) and the EMA of the weights (`ema`).

Imports: torch, hakubooru, and of this trainer only the leaf modules. Nothing here knows about
SDXL, LoKr, shards or the loop.
"""
