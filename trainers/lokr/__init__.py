"""SDXL LoKr trainer on hakubooru shard folders: ``python -m trainers.lokr --help``.

The loop sits here (``train``, ``config``, ``state``, ``distributed``, the commands); below it
``observe/`` (samples, curves, reports), ``network/`` (the LoKr and its file) and ``data/``
(shards → batches, the latent cache), and at the bottom ``sdxl/`` (the base model). Imports
flow down only — docs/architecture.md, checked by tests/test_imports.py.
"""
import logging

# bitsandbytes' CPU backend warns on import about a 4-bit GEMM kernel that Lion8bit never uses
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers says once per image processor that torchvision is missing when diffusers' SDXL
# pipeline imports CLIP's and SigLIP's (sampling, save_sdxl); nothing here uses one
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
# diffusers warns on every `model.to(dtype)` that modules "should be kept in float32", even when
# it names none (`[]`); the loaders cast on purpose. A non-empty list still shows.
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())
