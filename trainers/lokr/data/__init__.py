"""Training data from a shard folder: the index read once at start-up (`index`), the integrity
checks against the manifest (`integrity`), aspect buckets and crops (`bucketing`), the
per-epoch batch plan and the Dataset of collated micro-batches (`batches`), caption
augmentation (`augment`), and the latent cache in one place — the VAE encoding in
sub-batches (`vae_encode`), the cache's format and reader (`latent_cache`) and its builder,
``python -m trainers.lokr.cache`` (`latent_cache_build`).

Imports: torch, PIL, pyarrow, hakubooru, `trainers.lokr.sdxl` (the VAE the cache builder
loads) and the leaf modules (`config`, `distributed`, `safetensors_file`). Never
`network`, `observe` or the loop.
"""
