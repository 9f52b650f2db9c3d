# shellcheck shell=bash
#
# scripts/services.sh — make sure a PostgreSQL and a Redis are reachable for
# the tests and the demo, and export where they are:
#
#   TASKING_DATABASE_URL  PostgreSQL connection URL
#                         (default postgres://postgres@127.0.0.1:5432/test?sslmode=disable)
#   TASKING_REDIS_ADDR    Redis host:port (default 127.0.0.1:6379)
#
# Meant to be *sourced* from a bash script (scripts/test.sh, scripts/demo.sh):
#
#   source "$(dirname "$0")/services.sh"
#
# Values the user already exported are respected. If a service is not
# reachable, a throwaway instance is started on a free port of 127.0.0.1 in a
# temporary directory, and an EXIT/INT/TERM trap in the sourcing shell stops it
# and removes the directory again. Missing server binaries are installed with
# apt-get when running as root; otherwise we print what to install and exit 1.
#
# Knobs (mostly for testing this script itself):
#   TASKING_THROWAWAY=1       always start throwaway instances, even if the
#                             configured/default services are reachable
#   TASKING_PG_BINDIR=DIR     look for initdb/pg_ctl/postgres only in DIR
#   TASKING_REDIS_SERVER=PATH use this redis-server binary (only this one)
#
# Executed directly instead of sourced, it runs its arguments with the
# services in place, e.g. `scripts/services.sh bash` for a shell.
#
# Everything here must keep working under the caller's `set -euo pipefail`,
# so probes are written as explicit `if` tests and unset variables get
# defaults. Helper names start with _tasking_ to stay out of the caller's way.

if [ -z "${BASH_VERSION:-}" ]; then
	echo "services.sh: needs bash" >&2
	# shellcheck disable=SC2317 # exit is reached when executed, not sourced
	return 1 2>/dev/null || exit 1
fi

_tasking_default_db_url='postgres://postgres@127.0.0.1:5432/test?sslmode=disable'
_tasking_default_redis_addr='127.0.0.1:6379'
_tasking_tmp=''         # temp dir of the throwaway instances ('' = none)
_tasking_pg_bindir=''   # where initdb/pg_ctl/postgres live
_tasking_pg_started=''  # non-empty once a throwaway PostgreSQL may be running
_tasking_redis_bin=''
_tasking_redis_pid=''

_tasking_log() { echo "tasking: $*" >&2; }

_tasking_is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as the user that owns the throwaway PostgreSQL. initdb,
# pg_ctl and postgres refuse to run as root, so as root we drop to the
# `postgres` system user. The cd keeps them from complaining that they
# cannot access the caller's working directory (e.g. /root).
_tasking_as_pg() {
	if _tasking_is_root; then
		(cd "$_tasking_tmp" && runuser -u postgres -- "$@")
	else
		"$@"
	fi
}

# Hide the password of a connection URL or key=value string before printing.
_tasking_redact() {
	printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#; s#(password=)[^ &]*#\1***#g'
}

# Split "host:port" / "[v6]:port" into _tasking_host and _tasking_port.
_tasking_split_hostport() {
	local hp=$1 default_port=$2
	_tasking_host=${hp%:*}
	_tasking_port=${hp##*:}
	if [ "$_tasking_host" = "$hp" ] || [[ $hp == \[*\] ]]; then
		_tasking_host=$hp
		_tasking_port=$default_port
	fi
	_tasking_host=${_tasking_host#[}
	_tasking_host=${_tasking_host%]}
	[ -n "$_tasking_host" ] || _tasking_host=127.0.0.1
	[ -n "$_tasking_port" ] || _tasking_port=$default_port
}

# True if something accepts TCP connections on host $1 port $2.
# Uses bash's /dev/tcp; `timeout` keeps an unroutable host from hanging us.
_tasking_tcp_open() {
	# shellcheck disable=SC2016 # $1/$2 expand in the inner bash
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# True if PostgreSQL at URL $1 answers. The strongest test available wins:
# a real query with psql (also proves auth and that the database exists),
# else pg_isready, else a plain TCP connect to the URL's host:port.
_tasking_pg_ok() {
	local url=$1
	if command -v psql >/dev/null 2>&1; then
		# -w: never prompt for a password (that would hang a script);
		# -X: ignore the user's ~/.psqlrc.
		PGCONNECT_TIMEOUT=3 timeout 10 psql -X -w -Atq -d "$url" -c 'select 1' >/dev/null 2>&1
	elif command -v pg_isready >/dev/null 2>&1; then
		timeout 10 pg_isready -q -t 3 -d "$url" >/dev/null 2>&1
	else
		local hp
		case $url in
		postgres://* | postgresql://*)
			hp=${url#*://}   # drop scheme
			hp=${hp%%[/?]*}  # drop /db?params
			hp=${hp##*@}     # drop user:password@
			;;
		*) hp=127.0.0.1:5432 ;; # key=value strings: just try the default
		esac
		_tasking_split_hostport "$hp" 5432
		_tasking_tcp_open "$_tasking_host" "$_tasking_port"
	fi
}

# True if a Redis at "host:port" $1 answers PING with PONG.
_tasking_redis_ok() {
	_tasking_split_hostport "$1" 6379
	local reply=''
	if command -v redis-cli >/dev/null 2>&1; then
		reply=$(timeout 3 redis-cli -h "$_tasking_host" -p "$_tasking_port" ping 2>/dev/null) || return 1
	else
		# Speak just enough RESP by hand: send PING, expect "+PONG".
		# shellcheck disable=SC2016 # $1/$2 expand in the inner bash
		reply=$(timeout 3 bash -c '
			exec 3<>"/dev/tcp/$1/$2" || exit 1
			printf "PING\r\n" >&3
			IFS= read -r line <&3 && printf "%s" "$line"
		' _ "$_tasking_host" "$_tasking_port" 2>/dev/null) || return 1
		reply=${reply%$'\r'}
		reply=${reply#+}
	fi
	[ "$reply" = PONG ]
}

# Print a TCP port on 127.0.0.1 that nothing listens on. Picked at random
# below 32768 so it stays out of Linux's ephemeral range (used for outgoing
# connections), and checked by trying to connect to it.
_tasking_free_port() {
	local port
	for _ in $(seq 1 50); do
		port=$((20000 + RANDOM % 12000))
		if ! _tasking_tcp_open 127.0.0.1 "$port"; then
			echo "$port"
			return 0
		fi
	done
	_tasking_log "could not find a free TCP port on 127.0.0.1"
	return 1
}

# Find a directory with initdb, pg_ctl and postgres: the override, else the
# newest Debian/Ubuntu versioned dir, else whatever PATH has, else the
# source-build default. Sets _tasking_pg_bindir; false if none.
_tasking_find_pg_bindir() {
	local d candidates=()
	if [ -n "${TASKING_PG_BINDIR:-}" ]; then
		candidates=("$TASKING_PG_BINDIR")
	else
		# sort -V so that e.g. 16 beats 9.6; newest first. (The paths are
		# fixed and space-free, so parsing ls is fine here.)
		# shellcheck disable=SC2012
		while IFS= read -r d; do
			candidates+=("$d")
		done < <(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV)
		if command -v initdb >/dev/null 2>&1; then
			candidates+=("$(dirname "$(command -v initdb)")")
		fi
		candidates+=(/usr/local/pgsql/bin)
	fi
	for d in "${candidates[@]}"; do
		if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
			_tasking_pg_bindir=$d
			return 0
		fi
	done
	return 1
}

# Find redis-server. Sets _tasking_redis_bin; false if none.
_tasking_find_redis() {
	local c
	if [ -n "${TASKING_REDIS_SERVER:-}" ]; then
		[ -x "$TASKING_REDIS_SERVER" ] || return 1
		_tasking_redis_bin=$TASKING_REDIS_SERVER
		return 0
	fi
	for c in "$(command -v redis-server 2>/dev/null || true)" /usr/bin/redis-server /usr/local/bin/redis-server; do
		if [ -n "$c" ] && [ -x "$c" ]; then
			_tasking_redis_bin=$c
			return 0
		fi
	done
	return 1
}

# Make sure the binaries for the throwaway servers we need exist,
# installing them as root. $1/$2: "1" if PostgreSQL/Redis are needed.
_tasking_ensure_binaries() {
	local need_pg=$1 need_redis=$2 pkgs=()
	if [ "$need_pg" = 1 ] && ! _tasking_find_pg_bindir; then pkgs+=(postgresql); fi
	if [ "$need_redis" = 1 ] && ! _tasking_find_redis; then pkgs+=(redis-server); fi
	[ ${#pkgs[@]} -gt 0 ] || return 0

	if ! _tasking_is_root || ! command -v apt-get >/dev/null 2>&1; then
		local what=${pkgs[*]}
		what=${what/postgresql/PostgreSQL}
		what=${what/redis-server/Redis}
		_tasking_log "no reachable ${what// / or } server, and none installed to start a throwaway one."
		cat >&2 <<-'EOF'
			Install PostgreSQL and Redis first (Debian/Ubuntu):

			    sudo apt-get install -y postgresql redis-server

			or point the scripts at running servers:

			    export TASKING_DATABASE_URL='postgres://user:password@host:5432/dbname?sslmode=disable'
			    export TASKING_REDIS_ADDR='host:6379'
		EOF
		exit 1
	fi

	_tasking_log "installing ${pkgs[*]} with apt-get (running as root)..."
	# Non-interactive: no debconf prompts, and keep whatever config files
	# exist. Output goes to stderr so it can't pollute the demo's stdout.
	{
		DEBIAN_FRONTEND=noninteractive apt-get update -q &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${pkgs[@]}"
	} >&2 || {
		_tasking_log "apt-get install ${pkgs[*]} failed"
		exit 1
	}
	if [ "$need_pg" = 1 ] && ! _tasking_find_pg_bindir; then
		_tasking_log "installed postgresql but found no initdb/pg_ctl/postgres${TASKING_PG_BINDIR:+ in TASKING_PG_BINDIR=$TASKING_PG_BINDIR}"
		exit 1
	fi
	if [ "$need_redis" = 1 ] && ! _tasking_find_redis; then
		_tasking_log "installed redis-server but found no redis-server binary${TASKING_REDIS_SERVER:+ at TASKING_REDIS_SERVER=$TASKING_REDIS_SERVER}"
		exit 1
	fi
}

# Create the temp dir that holds the throwaway data, sockets and logs.
_tasking_make_tmp() {
	[ -z "$_tasking_tmp" ] || return 0
	# As root, use /tmp rather than $TMPDIR: the postgres user must be able
	# to reach the directory, and a TMPDIR under /root would not allow that.
	if _tasking_is_root; then
		_tasking_tmp=$(mktemp -d /tmp/tasking-services.XXXXXX)
	else
		_tasking_tmp=$(mktemp -d "${TMPDIR:-/tmp}/tasking-services.XXXXXX")
	fi
}

# Print the last lines of a log file, to explain a failed start.
_tasking_show_log() {
	if [ -f "$1" ]; then
		_tasking_log "last lines of $(basename "$1"):"
		tail -n 20 "$1" >&2 || true
	fi
}

# Start a throwaway PostgreSQL and set TASKING_DATABASE_URL to it.
_tasking_start_pg() {
	local bin=$_tasking_pg_bindir port data sock log attempt
	_tasking_make_tmp
	data=$_tasking_tmp/pgdata
	sock=$_tasking_tmp/pgsocket
	log=$_tasking_tmp/postgres.log

	if _tasking_is_root; then
		# The packages create this user; a self-built PostgreSQL may not have.
		if ! id postgres >/dev/null 2>&1; then
			useradd --system --no-create-home --shell /usr/sbin/nologin postgres
		fi
		chown postgres: "$_tasking_tmp"
	fi
	_tasking_as_pg mkdir -p "$sock"
	_tasking_as_pg touch "$log"

	# Trust auth: local, throwaway, bound to 127.0.0.1 only. --locale=C
	# avoids depending on which locales the machine has generated.
	if ! _tasking_as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C --no-sync >>"$log" 2>&1; then
		_tasking_log "initdb failed"
		_tasking_show_log "$log"
		exit 1
	fi

	# Retry on a new port if the start fails: someone may grab the port
	# between our check and postgres binding it.
	for attempt in 1 2 3; do
		port=$(_tasking_free_port) || exit 1
		_tasking_pg_started=1
		# fsync and friends off: the data is thrown away anyway, and it
		# makes the tests faster. pg_ctl -w waits until the server accepts
		# connections (or gives up after -t seconds); pg_ctl also puts the
		# postmaster in its own session, so a Ctrl-C in the terminal does
		# not kill the database under a program that is still shutting down.
		if _tasking_as_pg "$bin/pg_ctl" -D "$data" -l "$log" -w -t 30 -s \
			-o "-p $port -c listen_addresses=127.0.0.1 -k '$sock' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
			start >"$_tasking_tmp/pg_ctl.out" 2>&1; then
			break
		fi
		_tasking_stop_pg
		if [ "$attempt" = 3 ]; then
			_tasking_log "could not start a throwaway PostgreSQL"
			_tasking_show_log "$_tasking_tmp/pg_ctl.out"
			_tasking_show_log "$log"
			exit 1
		fi
	done

	# Over the unix socket, as the superuser initdb created (trust auth).
	local psql=$bin/psql url
	[ -x "$psql" ] || psql=psql
	if ! _tasking_as_pg "$psql" -X -q -h "$sock" -p "$port" -U postgres -d postgres \
		-c 'CREATE DATABASE test' >>"$log" 2>&1; then
		_tasking_log "could not create database test in the throwaway PostgreSQL"
		_tasking_show_log "$log"
		exit 1
	fi

	# Belt and braces: check it the way the tests will connect, over TCP.
	url="postgres://postgres@127.0.0.1:$port/test?sslmode=disable"
	for _ in $(seq 1 100); do
		if _tasking_pg_ok "$url"; then
			TASKING_DATABASE_URL=$url
			return 0
		fi
		sleep 0.1
	done
	_tasking_log "throwaway PostgreSQL does not answer on $url"
	_tasking_show_log "$log"
	exit 1
}

# Stop the throwaway PostgreSQL, if one may be running. Idempotent.
_tasking_stop_pg() {
	local data=$_tasking_tmp/pgdata pid=''
	[ -n "$_tasking_pg_started" ] || return 0
	_tasking_pg_started=''
	[ -f "$data/postmaster.pid" ] || return 0
	pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
	# "immediate" is fine: nothing in there is worth a clean checkpoint.
	_tasking_as_pg "$_tasking_pg_bindir/pg_ctl" -D "$data" -m immediate -w -t 10 -s stop >/dev/null 2>&1 || true
	# If pg_ctl could not do it, make sure the postmaster really is gone,
	# or removing its directory below would pull the floor out from under it.
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null || true
	fi
}

# Start a throwaway Redis and set TASKING_REDIS_ADDR to it.
_tasking_start_redis() {
	local port dir log pidfile attempt setsid=()
	_tasking_make_tmp
	dir=$_tasking_tmp/redis
	log=$_tasking_tmp/redis.log
	pidfile=$_tasking_tmp/redis.pid
	mkdir -p "$dir"
	# setsid gives Redis its own session, so a Ctrl-C in the terminal
	# reaches only the program under test (which may still need Redis while
	# it shuts down); our trap stops Redis after that program has ended.
	if command -v setsid >/dev/null 2>&1; then setsid=(setsid); fi
	for attempt in 1 2 3; do
		port=$(_tasking_free_port) || exit 1
		# Nothing persisted; a foreground (non-daemonized) process of ours.
		"${setsid[@]}" "$_tasking_redis_bin" --port "$port" --bind 127.0.0.1 \
			--save "" --appendonly no --daemonize no \
			--dir "$dir" --logfile "$log" --pidfile "$pidfile" \
			</dev/null >/dev/null 2>&1 &
		_tasking_redis_pid=$!
		# Wait until it answers PING, up to ~10 s; bail out early if it died.
		for _ in $(seq 1 100); do
			if _tasking_redis_ok "127.0.0.1:$port"; then
				TASKING_REDIS_ADDR=127.0.0.1:$port
				# Redis' own pid: $! is setsid's if setsid had to fork.
				if [ -s "$pidfile" ]; then _tasking_redis_pid=$(cat "$pidfile"); fi
				return 0
			fi
			kill -0 "$_tasking_redis_pid" 2>/dev/null || break
			sleep 0.1
		done
		_tasking_stop_redis
	done
	_tasking_log "could not start a throwaway Redis"
	_tasking_show_log "$log"
	exit 1
}

# Stop the throwaway Redis, if any. Idempotent.
_tasking_stop_redis() {
	local pid=$_tasking_redis_pid
	[ -n "$pid" ] || return 0
	_tasking_redis_pid=''
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

# The trap: stop whatever we started and remove the temp dir. Must never
# fail (it runs on the way out, under set -e) and must keep the caller's
# exit status, so it only uses `|| true`-guarded commands and returns $rc.
_tasking_cleanup() {
	local rc=$?
	_tasking_stop_redis || true
	_tasking_stop_pg || true
	if [ -n "$_tasking_tmp" ] && [ -d "$_tasking_tmp" ]; then
		rm -rf "$_tasking_tmp" || true
	fi
	_tasking_tmp=''
	return "$rc"
}

# Install the traps before anything is started, so that a failure half-way
# (or a Ctrl-C during initdb) still cleans up. Signals exit with the usual
# 128+N status, which in turn runs the EXIT trap. Note: this replaces any
# EXIT/INT/TERM trap the sourcing script set earlier.
trap _tasking_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

_tasking_main() {
	local db_url=${TASKING_DATABASE_URL:-$_tasking_default_db_url}
	local redis_addr=${TASKING_REDIS_ADDR:-$_tasking_default_redis_addr}
	local need_pg=0 need_redis=0 pg_how=existing redis_how=existing

	if [ "${TASKING_THROWAWAY:-}" = 1 ]; then
		need_pg=1
		need_redis=1
	else
		if ! _tasking_pg_ok "$db_url"; then
			need_pg=1
			if [ -n "${TASKING_DATABASE_URL:-}" ]; then
				_tasking_log "WARNING: TASKING_DATABASE_URL=$(_tasking_redact "$db_url") is not reachable; using a throwaway PostgreSQL instead"
			fi
		fi
		if ! _tasking_redis_ok "$redis_addr"; then
			need_redis=1
			if [ -n "${TASKING_REDIS_ADDR:-}" ]; then
				_tasking_log "WARNING: TASKING_REDIS_ADDR=$redis_addr is not reachable; using a throwaway Redis instead"
			fi
		fi
	fi

	_tasking_ensure_binaries "$need_pg" "$need_redis"

	if [ "$need_pg" = 1 ]; then
		_tasking_start_pg
		db_url=$TASKING_DATABASE_URL
		pg_how=throwaway
	fi
	if [ "$need_redis" = 1 ]; then
		_tasking_start_redis
		redis_addr=$TASKING_REDIS_ADDR
		redis_how=throwaway
	fi

	export TASKING_DATABASE_URL=$db_url
	export TASKING_REDIS_ADDR=$redis_addr
	_tasking_log "PostgreSQL $(_tasking_redact "$TASKING_DATABASE_URL") ($pg_how), Redis $TASKING_REDIS_ADDR ($redis_how)"
}

# Executed rather than sourced: run the given command with the services.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	set -euo pipefail
	if [ $# -eq 0 ]; then
		echo "usage: source scripts/services.sh   (from a bash script)" >&2
		echo "   or: scripts/services.sh COMMAND [ARGS...]" >&2
		exit 2
	fi
	_tasking_main
	"$@"
else
	_tasking_main
fi
