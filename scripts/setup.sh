# Sourced by demo.sh and test.sh: create .venv (once) and install the project with everything
# it needs. torch is pinned to the CPU wheel these machines cache; GPU users install their own
# torch (>= 2.1) first and then `pip install -e '.[train]'`. The installs run again only when
# setup.cfg or pyproject.toml changed since the last one (a stamp in .venv), so the second
# command starts at once and prints nothing of pip's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.hakubooru-installed
wanted=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e '.[train,test]'
    # the eval extra's CCIP library pins numpy<2 (pyarrow needs 2); its code runs on 2 (docs/eval.md)
    python -m pip install -q --no-deps --no-warn-conflicts "dghs-imgutils==0.19.0"
    echo "$wanted" > "$stamp"
fi
