#!/usr/bin/env bash
# Install what the tests need (on a machine with only python3 + pip), then run the test suite.
#   bash tests/run.sh                 default suite (tests marked slow are left out)
#   bash tests/run.sh -m slow         only the slow tests;   bash tests/run.sh -m "" everything
#   bash tests/run.sh tests/test_platform.py -k inert      any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
exec "$PY" -m pytest -m "not slow" "$@"
