#!/usr/bin/env bash
# The official postgres image's contract, in brief: initialise PGDATA on first start from
# POSTGRES_USER / POSTGRES_PASSWORD(_FILE) / POSTGRES_DB, then run the server as user postgres.
set -Eeuo pipefail

file_env() {  # VAR [default]: VAR, or the contents of the file named by VAR_FILE
    local var=$1 file_var="${1}_FILE" default=${2:-}
    if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
        echo >&2 "error: both $var and $file_var are set (but are exclusive)"; exit 1
    fi
    local value=$default
    if [ -n "${!var:-}" ]; then value=${!var}; elif [ -n "${!file_var:-}" ]; then value=$(<"${!file_var}"); fi
    export "$var"="$value"
    unset "$file_var"
}

if [ "${1:0:1}" = '-' ]; then set -- postgres "$@"; fi

if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    # read secrets as root (a bind-mounted secret may be readable by root only), hand them on
    file_env POSTGRES_PASSWORD
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

if [ "$1" = postgres ]; then
    file_env POSTGRES_PASSWORD
    file_env POSTGRES_USER postgres
    file_env POSTGRES_DB "$POSTGRES_USER"
    auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        if [ -z "$POSTGRES_PASSWORD" ] && [ "$auth" != trust ]; then
            echo >&2 "error: database is uninitialized and POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) is not set"
            exit 1
        fi
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
        # shellcheck disable=SC2086
        initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host="$auth" \
            -D "$PGDATA" ${POSTGRES_INITDB_ARGS:-}
        rm -f "$pwfile"
        echo "host all all all $auth" >>"$PGDATA/pg_hba.conf"
        echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
        if [ "$POSTGRES_DB" != postgres ]; then
            psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
                -c "CREATE DATABASE \"$POSTGRES_DB\""
        fi
        for f in /docker-entrypoint-initdb.d/*; do
            case "$f" in
                *.sql) psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$f" ;;
                *.sh) . "$f" ;;
            esac
        done 2>/dev/null || true
        pg_ctl -D "$PGDATA" -m fast -w stop
        echo "PostgreSQL init process complete; ready for start up."
    fi
    unset POSTGRES_PASSWORD
fi

exec "$@"
