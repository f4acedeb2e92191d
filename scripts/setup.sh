# Sourced by demo.sh and test.sh: create .venv (once) and install the project with everything
# it needs. torch is pinned to the CPU wheel these machines cache; GPU users install their own
# torch (>= 2.1) first and then `pip install -e '.[train]'`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e '.[train,test]'
