#!/bin/sh
# First start: a cluster in $PGDATA, the role and database udpmsg (password from the file
# $POSTGRES_PASSWORD_FILE), password connections from anywhere on the container network. Then
# PostgreSQL runs as PID 1's only child: exec, so SIGINT (docker stop) is a fast shutdown.
set -eu
BIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -r "${POSTGRES_PASSWORD_FILE:-}" ] || { echo "POSTGRES_PASSWORD_FILE is not a readable file" >&2; exit 2; }
    "$BIN/initdb" -D "$PGDATA" -U postgres -A peer -E UTF8 --locale=C.UTF-8 >/dev/null
    {
        echo "listen_addresses = '*'"
        echo "password_encryption = 'scram-sha-256'"
    } >> "$PGDATA/postgresql.conf"
    {
        echo "host udpmsg udpmsg 0.0.0.0/0 scram-sha-256"
        echo "host udpmsg udpmsg ::/0 scram-sha-256"
    } >> "$PGDATA/pg_hba.conf"
    "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    # The password goes from the file into a psql variable, never through a command line.
    "$BIN/psql" -v ON_ERROR_STOP=1 -q -U postgres -d postgres -v "pwfile=$POSTGRES_PASSWORD_FILE" <<'SQL'
\set pw `head -n 1 :pwfile`
CREATE ROLE udpmsg LOGIN PASSWORD :'pw';
CREATE DATABASE udpmsg OWNER udpmsg;
SQL
    "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec "$BIN/postgres" -D "$PGDATA"
