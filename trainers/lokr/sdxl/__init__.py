"""The base model: the SDXL parts as one object (`model.SDXL`), built tiny or at real size on the
meta device, loaded from a diffusers folder or a single LDM `.safetensors` file (`loading`,
with the LDM ↔ diffusers tensor names in `ldm`), saved back, the long-prompt text encoding
both the training and the sampler use (`text`), and a fake real-size model for benchmarks
(`fake`, ``python -m trainers.lokr.sdxl.fake``).

Imports: torch, diffusers, transformers, hakubooru, and of this trainer only the leaf modules
(`trainers.lokr.safetensors_file`). Nothing here knows about LoKr, shards or the loop.
"""
