#!/usr/bin/env bash
# The LoKr's module set on the lowest and the highest transformers that setup.cfg allows
# (CLIP's attention class is CLIPAttention, CLIPSdpaAttention or CLIPFlashAttention2 by version):
# tests/trainer/network/test_recipe_network.py in a throwaway venv per version. Run by .ci/run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lowest=$(sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for spec in "transformers==${lowest}.*" "transformers"; do   # lowest allowed; newest on the index
    python3 -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install -q "torch==2.13.0"
    # the train extra and pytest only: the test extra's hf:// client (huggingface_hub >= 2.4) and
    # transformers 4.x (huggingface_hub < 1) cannot share an environment
    "$tmp/venv/bin/pip" install -q -e '.[train]' pytest "$spec"
    echo "tests/trainer/network/test_recipe_network.py with $("$tmp/venv/bin/python" -c 'import transformers as t; print("transformers", t.__version__)')"
    "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider tests/trainer/network/test_recipe_network.py
    rm -rf "$tmp/venv"
done
