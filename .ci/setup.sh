#!/usr/bin/env bash
# Everything `make test` needs besides the venv (the Makefile's install target makes that), on a Debian
# machine: the packages (Chromium for tests/test_ui*.py, PostgreSQL, Redis, python3-venv), then PostgreSQL
# and Redis running on 127.0.0.1. Idempotent, and quick when all is in place. `make test` runs it, and
# .ci/run is `CI=true make test`, so CI and a fresh clone set up the same way.
#
# Where a step needs root and we are not root (nor have password-less sudo), it stops at once and prints
# the one command that fixes it. Never `playwright install`: the tests drive Debian's /usr/bin/chromium.
# TUNESERVE_TEST_PG / TUNESERVE_TEST_REDIS pointing elsewhere than 127.0.0.1 skip starting local servers.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_ADMIN=${TUNESERVE_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}
REDIS_URL=${TUNESERVE_TEST_REDIS:-redis://127.0.0.1:6379/0}

say() { echo "setup: $*"; }
die() { echo "setup: error: $1" >&2; shift; [ $# -eq 0 ] || printf '\n    %s\n\n' "$*" >&2; exit 1; }

as_root() {  # run a command as root: directly, or through password-less sudo; status 126 if neither
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else return 126
    fi
}

local_url() { case "$1" in *@127.0.0.1[:/]*|*@localhost[:/]*|*//127.0.0.1[:/]*|*//localhost[:/]*) return 0;; esac; return 1; }

# ----------------------------------------------------------------------------- packages
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if local_url "$PG_ADMIN"; then
    command -v pg_ctlcluster >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    command -v psql >/dev/null || missing+=(postgresql-client)
fi
if local_url "$REDIS_URL"; then
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
fi
if [ ${#missing[@]} -gt 0 ]; then
    fix="sudo apt-get update && sudo apt-get install -y ${missing[*]}"
    as_root true 2>/dev/null || die "missing ${missing[*]}, and installing needs root. Run:" "$fix"
    say "installing ${missing[*]} (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get could not install ${missing[*]}. Try:" "$fix"
fi

# ----------------------------------------------------------------------------- PostgreSQL on 127.0.0.1:5432
if local_url "$PG_ADMIN" && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
    if [ -z "$version" ]; then
        version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
        start="pg_createcluster --start $version main"
    else
        start="pg_ctlcluster --skip-systemctl-redirect $version main start"
    fi
    say "starting PostgreSQL $version"
    # shellcheck disable=SC2086
    as_root $start >/dev/null || die "PostgreSQL is not running on 127.0.0.1:5432 and starting it needs root. Run:" "sudo $start"
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    pg_isready -h 127.0.0.1 -p 5432 -q || die "PostgreSQL did not come up; see /var/log/postgresql/"
fi
if local_url "$PG_ADMIN"; then
    psql "$PG_ADMIN" -tAc 'SELECT 1' >/dev/null 2>&1 || die "cannot log in as $PG_ADMIN. The tests create and \
drop their own databases, so they need a superuser without a password on 127.0.0.1 (or set TUNESERVE_TEST_PG to \
a URL that works). For a throwaway test machine:" \
        "echo 'host all postgres 127.0.0.1/32 trust' | sudo tee -a /etc/postgresql/*/main/pg_hba.conf && sudo pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main reload"
    # The suite makes (and drops) its own uniquely named database; this one is for manual runs.
    psql "$PG_ADMIN" -tAc "SELECT 1 FROM pg_database WHERE datname='tuneserve_test'" | grep -q 1 \
        || psql "$PG_ADMIN" -qc "CREATE DATABASE tuneserve_test" >/dev/null
fi

# ----------------------------------------------------------------------------- Redis on 127.0.0.1:6379
if local_url "$REDIS_URL" && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    say "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || die "Redis did not come up on 127.0.0.1:6379"
fi
say "ok: chromium, PostgreSQL and Redis ready"
