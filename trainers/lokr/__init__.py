"""SDXL LoKr trainer on hakubooru shard folders: ``python -m trainers.lokr --help``."""
import logging

# bitsandbytes' CPU backend warns on import about a 4-bit GEMM kernel that Lion8bit never uses
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
