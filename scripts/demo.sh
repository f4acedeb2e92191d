#!/usr/bin/env bash
# The README's first command: set up, then run the whole pipeline on built-in demo data —
# synthetic database + image archives -> epsilon selection -> captions -> shards -> a short
# CPU training of the tiny SDXL-shaped model with LoKr from a latent cache (sample images every
# 10 steps), the two reports (the dataset's, demo/report.html; the training curves,
# demo/train/report.html), the LoKr merged into the model (demo/merged.safetensors), and a
# 3-character CCIP eval of base vs LoKr (demo/eval/index.html) scored by a STAND-IN CCIP model
# (random weights, exported here: its numbers test the plumbing, not character identity).
source "$(dirname "$0")/setup.sh"
python examples/epsilon_selection.py --workdir demo --out demo/out
python -m trainers.lokr report --dataset demo/out --html demo/report.html --config tiny   # the dataset report, with the training buckets
python -m trainers.lokr.cache --config tiny --shards demo/out   # VAE latents once (demo/out/latents), used by the training
python -m trainers.lokr --config tiny --shards demo/out --output demo/train --max-steps 20 --set sample.every=10
python -m trainers.lokr report demo/train
rm -f demo/merged.safetensors  # a rerun of the demo merges anew (merge never overwrites)
python -m trainers.lokr merge --pretrained tiny --lokr demo/train/lokr.safetensors --out demo/merged.safetensors
python -m trainers.lokr.observe.ccip_standin demo/ccip-standin   # the stand-in CCIP model (no download)
rm -rf demo/eval  # a rerun of the demo evaluates anew
python -m trainers.lokr eval --pretrained tiny --config tiny --lokr demo/train/lokr.safetensors --shards demo/out --db demo/danbooru2023.db --out demo/eval --characters 3 --references 2 --images-per-character 2 --ccip-model demo/ccip-standin
