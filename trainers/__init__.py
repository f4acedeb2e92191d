"""Trainers that read hakubooru's shard folders (``trainers.lokr``: the SDXL LoKr trainer)."""
