#!/usr/bin/env bash
# The README's second command: set up, then run the test suite.
source "$(dirname "$0")/setup.sh"
python -m pytest -q "$@"
