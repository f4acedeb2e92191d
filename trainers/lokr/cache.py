"""``python -m trainers.lokr.cache``: build the latent cache of a shard folder. The command's
code lives with the cache's format and reader in ``trainers/lokr/data/`` (latent_cache_build.py)."""
import sys

from trainers.lokr.data.latent_cache_build import main

if __name__ == "__main__":
    sys.exit(main())
