#!/usr/bin/env bash
# JS tests of the web extension (web/), with node's built-in test runner: no npm, no network.
# Called by .ci/run; works from any directory.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v node >/dev/null 2>&1; then
  echo "js_tests: node (>= 20) is required to test web/; install Node.js and rerun" >&2
  exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "js_tests: node >= 20 is required (found $(node --version)); module hooks and node --test need it" >&2
  exit 1
fi
exec node --test tests/js/
