#!/usr/bin/env bash
# Run the quickstart example against a real PostgreSQL and Redis.
#
#   ./scripts/demo.sh [flags for the example...]
#
# services.sh uses TASKING_DATABASE_URL / TASKING_REDIS_ADDR if set and
# reachable, else the local defaults, else starts throwaway instances that
# are removed again when the demo exits (Ctrl-C included).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/services.sh

# Not `exec`: this shell must stay around to run the cleanup trap.
go run ./examples/quickstart "$@"
