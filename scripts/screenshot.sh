#!/usr/bin/env bash
# Screenshot an HTML page with headless Chromium (Debian: apt-get install -y chromium):
#   scripts/screenshot.sh PAGE.html OUT.png [WIDTH,HEIGHT]
# No network, no profile left behind (a throw-away --user-data-dir).
set -euo pipefail
page=$(realpath "$1"); out=$2; size=${3:-1280,2400}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --screenshot="$out" --window-size="$size" "file://$page" 2>/dev/null
test -s "$out"
