"""SDXL LoKr trainer on hakubooru shard folders: ``python -m trainers.lokr --help``."""
