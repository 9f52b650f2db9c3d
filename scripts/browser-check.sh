#!/usr/bin/env bash
# Load the dashboard's pages in a real browser (headless Chromium) and check
# what they show:
#
#   ./scripts/browser-check.sh
#
# It starts PostgreSQL as scripts/services.sh does (the configured one, the
# local default, or a throwaway one), runs the example fleet with the
# dashboard (examples/dashboard) on a free port, and loads the overview, the
# filtered task list, a waiting task's detail and the workers page with
# `chromium --headless --dump-dom`, asserting content in the rendered DOM.
# Needs Chromium (Debian: `apt-get install -y chromium`); installed with
# apt-get when run as root, otherwise the script says what to install. Not
# part of ./scripts/test.sh, since a fresh machine may lack the browser.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/services.sh

browser=''
for b in chromium chromium-browser google-chrome; do
	if command -v "$b" >/dev/null 2>&1; then
		browser=$(command -v "$b")
		break
	fi
done
if [ -z "$browser" ]; then
	if [ "$(id -u)" -eq 0 ]; then
		echo "browser-check: installing chromium" >&2
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
		browser=$(command -v chromium)
	else
		echo "browser-check: needs Chromium: sudo apt-get install -y chromium" >&2
		exit 1
	fi
fi

work=$(mktemp -d)
app_pid=''
cleanup() {
	if [ -n "$app_pid" ]; then
		kill -TERM "$app_pid" 2>/dev/null || true
		wait "$app_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/dashboard" ./examples/dashboard
port=$((20000 + RANDOM % 12000))
base="http://127.0.0.1:$port"
"$work/dashboard" -addr "127.0.0.1:$port" >"$work/app.log" 2>&1 &
app_pid=$!
for _ in $(seq 1 100); do
	if curl -fsS "$base/api/stats" >/dev/null 2>&1; then
		break
	fi
	if ! kill -0 "$app_pid" 2>/dev/null; then
		cat "$work/app.log" >&2
		echo "browser-check: the example did not start" >&2
		exit 1
	fi
	sleep 0.1
done
# Let the fleet run a little, so every state has tasks.
sleep 3

failures=0
# load URL: the DOM Chromium rendered for it.
load() {
	timeout 60 "$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
		--user-data-dir="$work/profile" --virtual-time-budget=2000 --dump-dom "$1" 2>/dev/null
}
# check NAME URL PATTERN...: every (extended) regexp is found in the page.
check() {
	local name=$1 url=$2
	shift 2
	local dom
	dom=$(load "$url")
	for pat in "$@"; do
		if grep -Eq -- "$pat" <<<"$dom"; then
			echo "ok   $name: /$pat/"
		else
			echo "FAIL $name: /$pat/ not found at $url" >&2
			failures=$((failures + 1))
		fi
	done
}

check overview "$base/" \
	'<h1>Overview</h1>' 'Tasks by state' \
	'no live worker handles archive' 'sync-worker' 'media-worker'
check "waiting tasks" "$base/tasks?state=waiting" \
	'<table id="tasks">' 'state-waiting' '<option selected="">waiting</option>'
archive=$(curl -fsS "$base/api/tasks?name=archive" | sed -nE 's/^ *"id": ([0-9]+),?$/\1/p' | head -1)
check "unhandled task" "$base/tasks/$archive" \
	"Task $archive: archive" 'Why is it waiting\?' 'No live worker handles “archive”' 'id="cancel"'
behind=$(curl -fsS "$base/api/tasks?name=sync&state=waiting&resource=repo:a&limit=1" | sed -nE 's/^ *"id": ([0-9]+),?$/\1/p' | head -1)
if [ -n "$behind" ]; then
	check "blocked task" "$base/tasks/$behind" \
		'Why is it waiting\?' "<a href=\"/tasks/$archive\">task $archive</a>" 'is ahead in line'
else
	echo "FAIL blocked task: no sync task waits on repo:a" >&2
	failures=$((failures + 1))
fi
check workers "$base/workers" \
	'<table id="workers">' 'sync-worker' 'media-worker' '[0-9]+ / 3' '[0-9]+ / 2'

if [ "$failures" -gt 0 ]; then
	echo "browser-check: $failures checks failed" >&2
	exit 1
fi
echo "browser-check: all pages render as expected in $("$browser" --version 2>/dev/null || echo chromium)"
