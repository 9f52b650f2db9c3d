#!/usr/bin/env bash
# Run the whole test suite against a real PostgreSQL and Redis.
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh -short          # extra arguments go to `go test`
#   ./scripts/test.sh -run TestFoo -v
#
# services.sh uses TASKING_DATABASE_URL / TASKING_REDIS_ADDR if set and
# reachable, else the local defaults, else starts throwaway instances that
# are removed again when this script exits.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/services.sh

# The race detector needs cgo, i.e. a C compiler. Go turns cgo off by itself
# when it finds none, and `-race` then fails outright; rather than fail on a
# fresh machine, run without it and say how to get it back.
race=(-race)
if [ "$(go env CGO_ENABLED)" != 1 ]; then
	echo "tasking: WARNING: cgo is off (CGO_ENABLED=0 or no C compiler), running without -race; for -race: sudo apt-get install -y gcc" >&2
	race=()
fi

# Not `exec`: this shell must stay around to run the cleanup trap. Under
# set -e a failing go test ends the script with go test's own exit status.
go test "${race[@]}" -count=1 -timeout 15m ./... "$@"
