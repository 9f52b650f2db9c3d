#!/usr/bin/env bash
# The scaling table of issue 8, in one session: noop and mix backlogs
# (30,000 tasks, 80 slots in all) at 1, 4 and 16 worker processes with both
# lockers and River, then Pulp's fleet (80 processes × 1 slot, unique names,
# 300 ms bodies, both lockers) and the same fleet of 200 behind a throwaway
# PgBouncer (Redis locker); each run 3 times, interleaved, medians.
#
#   ./scripts/scaling.sh                      # ~25 minutes; writes scaling.md and scaling.json here
#   ./scripts/scaling.sh -repeat 1 -tasks 5000 -bouncer-procs 0   # a quick look
#
# Flags go to the bench (examples/bench/README.md lists them). Both programs
# are built first, so the compiler does not compete with the measurements.
# services.sh uses TASKING_DATABASE_URL / TASKING_REDIS_ADDR if set and
# reachable, else the local defaults, else starts throwaway instances.
set -euo pipefail

out=$PWD/scaling
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TMPDIR:-/tmp}/tasking-scaling
mkdir -p "$bin"
echo "scaling.sh: building the bench and the River program into $bin" >&2
go build -o "$bin/bench" ./examples/bench
(cd examples/bench/river && go build -o "$bin/river" .)

source scripts/services.sh

# Not `exec`: this shell must stay around to run the cleanup trap.
"$bin/bench" -scaling -river "$bin/river" -out "$out" "$@"
